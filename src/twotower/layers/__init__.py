"""NemotronH building blocks: norms, Mamba-2, attention, MoE and the dense MLP."""
