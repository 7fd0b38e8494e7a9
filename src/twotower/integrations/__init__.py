"""Optional integrations with other systems. Importing this package imports none of them: each module
here needs its own extra (`twotower.integrations.ray` needs `pip install 'twotower[ray]'`)."""
