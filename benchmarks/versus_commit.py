"""This code against the same package at an earlier commit, side by side in one process.

The package at `--baseline` (a git revision; default `e3110fa`, the code when issue 19 was filed)
is extracted from this repository's history with `git archive` into a temporary directory and
imported under another name (`twotower_at_<rev>`; the model code imports itself relatively). One
random-weight TwoTower is built by this code, written with `save_pretrained` and read back by the
baseline's `from_pretrained`, so both run the same weights. Before anything is timed, the two must
agree: the denoiser's and the commit's logits to a tolerance, and greedy diffusion in as many
denoiser forwards (its tokens are reported: a random model's near-flat logits can tie).
Then, batch 1, the two versions interleaved call by call, medians of `--repeats` calls per round
and the median over `--rounds` rounds:

    denoise   one denoiser forward over a block of `--block-size` masked tokens (head on all of them)
    commit    the context tower over a committed block, and the head at its last position
    ar_step   the context tower and head over one new token
    diffusion greedy mask diffusion (`generate_mask_diffusion`, `--new-tokens`, threshold 0.9), end
              to end: tokens per second

The default model is issue 19's peer-comparison model: hidden 256, 8 layers (`M*EM*EME`), the
release's scan chunk of 128. Issue 19 measured NVIDIA's released code on it (its GPU code path over
pure-PyTorch kernels, CPU) decoding diffusion 1.14-1.19x faster than the code at `e3110fa`; that
code is not in this workplace, so the report projects against it through this measured ratio
(`--peer-ratio`, printed as projected, never as measured).

    python benchmarks/versus_commit.py --threads 1 [--baseline REV] [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # profile_forwards, next to this file
from profile_forwards import median_ms  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = "e3110fa"
PEER_RATIO = (1.14, 1.19)  # issue 19: NVIDIA's released code's diffusion tokens/s over e3110fa's
PEER_GOAL = 1.5  # issue 19, item 2: denoiser and commit forwards at least 1.5x faster than the peer's
FORWARDS = ("denoise", "commit", "ar_step")
COMPILED = ("denoise_compiled", "commit_compiled")  # `decode_step="compiled"`'s fixed-shape forwards
LOGIT_TOL = 1e-4  # max |logit difference| allowed between the versions (float32)


class BaselineError(RuntimeError):
    """The baseline revision cannot be extracted or imported."""


def short_revision(rev: str, *, repo: Path = REPO) -> str:
    """`rev`'s short commit hash in `repo`; BaselineError where git or the commit is missing."""
    try:
        return subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", f"{rev}^{{commit}}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except FileNotFoundError as e:
        raise BaselineError("git is not installed") from e
    except subprocess.CalledProcessError as e:
        raise BaselineError(f"{rev!r} is not a commit of {repo} ({e.stderr.strip()})") from e


def import_at_revision(rev: str, into: Path, *, repo: Path = REPO, package: str = "twotower") -> ModuleType:
    """`src/<package>` as it was at `rev` in `repo`, extracted into `into` and imported as
    `<package>_at_<short rev>` (the package must import itself relatively)."""
    short = short_revision(rev, repo=repo)
    name = f"{package}_at_{short}"
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", short, f"src/{package}"], capture_output=True
    )
    if archive.returncode != 0:
        raise BaselineError(f"{short} has no src/{package}: {archive.stderr.decode(errors='replace').strip()}")
    untar = subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, capture_output=True)
    if untar.returncode != 0:
        raise BaselineError(f"could not unpack {short}: {untar.stderr.decode(errors='replace').strip()}")
    (into / "src" / package).rename(into / name)
    sys.path.insert(0, str(into))
    before = dict(custom_op_libraries())
    try:
        module = importlib.import_module(name)
    except RuntimeError as e:  # e.g. a torch custom op both versions register under one name
        raise BaselineError(f"{short} cannot be imported next to this code: {e}") from e
    finally:
        sys.path.remove(str(into))
    replaced = sorted(q for q, lib in custom_op_libraries() if q in before and before[q] is not lib)
    if replaced:  # torch keeps one definition per name: the last one registered
        print(
            f"warning: {short} registers {', '.join(replaced)} too; calls to them from this code now run "
            f"{short}'s implementations (run this comparison in a process of its own)",
            file=sys.stderr,
        )
    return module


def custom_op_libraries() -> list[tuple[str, object]]:
    """(qualified name, the library defining it) of every `torch.library.custom_op` in this process."""
    from torch._library import custom_ops

    return list(getattr(custom_ops, "OPDEF_TO_LIB", {}).items())


def peer_config(pkg: ModuleType, *, chunk_size: int):
    """A stand-in for issue 19's comparison model (12.7M parameters, hidden 256, 8 layers; its other
    widths were not given): 12.6M parameters, 8 experts of 128 (top-2), the given scan chunk."""
    return pkg.NemotronHConfig.from_dict(
        {
            "vocab_size": 4096,
            "hidden_size": 256,
            "hybrid_override_pattern": "M*EM*EME",
            "num_hidden_layers": 8,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "mamba_num_heads": 8,
            "mamba_head_dim": 64,
            "ssm_state_size": 64,
            "n_groups": 1,
            "chunk_size": chunk_size,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 128,
            "moe_shared_expert_intermediate_size": 512,
            "intermediate_size": 1024,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
        }
    )


def _context_class(pkg: ModuleType):
    """`DenoiserContext`: in `context.py` now, in `model.py` at older commits."""
    try:
        return importlib.import_module(f"{pkg.__name__}.context").DenoiserContext
    except ImportError:
        return importlib.import_module(f"{pkg.__name__}.model").DenoiserContext


class Version:
    """One version's model and its timed calls over the same inputs."""

    def __init__(self, label: str, pkg: ModuleType, path: Path, inputs: dict[str, torch.Tensor], block: int) -> None:
        self.label, self.pkg = label, pkg
        self.model = pkg.TwoTowerForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.diffusion = importlib.import_module(f"{pkg.__name__}.decode.diffusion").generate_mask_diffusion
        self.inputs, self.block = inputs, block
        prompt = inputs["prompt"]
        self.context = prompt.shape[1]
        self.cache = self.model.empty_cache(1, capacity=self.context + block)
        self.model.extend_context(prompt, self.cache)
        self.prefilled = self.cache.snapshot()
        self.denoiser_context = _context_class(pkg).from_cache(self.cache)
        self.decoder = self.fixed_denoiser = None

    def compile(self) -> None:
        """The fixed-shape forwards `decode_step="compiled"` runs (`StaticDecoder`'s block append and
        `FixedShapeDenoiser`), over the same context, compiled by their first calls."""
        static = importlib.import_module(f"{self.pkg.__name__}.decode.static")
        prefill = self.model.empty_cache(1, capacity=self.context)
        self.model.extend_context(self.inputs["prompt"], prefill)
        self.prefill = prefill
        capacity = static.round_capacity(self.context + self.block + 1)
        self.decoder = static.StaticDecoder(
            self.model.context_tower, self.model.context_lm_head, 1, capacity, compile=True
        )
        self.decoder.load(prefill)
        self.static_context = self.decoder.denoiser_context()
        self.fixed_denoiser = static.FixedShapeDenoiser(self.model, compile=True)

    def denoise_compiled(self) -> torch.Tensor:
        return self.fixed_denoiser(self.inputs["canvas"], self.inputs["t"], self.static_context)

    def commit_compiled(self) -> torch.Tensor:
        decoder = self.decoder
        decoder.position.fill_(self.context)
        decoder.length = self.context
        decoder.valid[:, self.context :] = False
        for i in decoder.conv:  # the Mamba states, as `StaticDecoder.load` sets them
            state = self.prefill.mamba(i)
            decoder.conv[i].copy_(state.conv)
            decoder.ssm[i].copy_(state.ssm)
        return decoder.append(self.inputs["block"])

    def _rewind(self) -> None:
        """Back to the prefilled context (length, key mask and Mamba states) before each call."""
        self.cache.restore(self.prefilled)

    def denoise(self) -> torch.Tensor:
        return self.model.denoise(self.inputs["canvas"], self.inputs["t"], self.denoiser_context)

    def commit(self) -> torch.Tensor:
        self._rewind()
        return self.model.context_lm_head(self.model.context_tower(self.inputs["block"], cache=self.cache)[:, -1:])

    def ar_step(self) -> torch.Tensor:
        self._rewind()
        return self.model.context_forward(self.inputs["block"][:, :1], cache=self.cache)

    def generate(self, new_tokens: int, decode_step: str = "eager"):
        return self.diffusion(
            self.model,
            self.inputs["prompt"],
            max_new_tokens=new_tokens,
            block_size=self.block,
            eos_token_id=None,
            decode_step=decode_step,
        )

    def diffusion_eager(self, new_tokens: int):
        return self.generate(new_tokens)

    def diffusion_compiled(self, new_tokens: int):
        return self.generate(new_tokens, "compiled")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _logits(out) -> torch.Tensor:
    return (out.logits if hasattr(out, "logits") else out).double()


def check_agreement(new: Version, old: Version, new_tokens: int, *, compiled: bool) -> dict[str, float | bool]:
    """The versions compute the same thing: the logits of each forward (and of each compiled
    forward, against this code's eager one) within LOGIT_TOL, and as many denoiser forwards in greedy
    diffusion, eager and compiled (whether the tokens are equal is reported). Raises AssertionError otherwise, before anything is timed."""
    out: dict[str, float | bool] = {}
    pairs = [(name, getattr(new, name), getattr(old, name)) for name in ("denoise", "commit")]
    if compiled:
        for version in (new, old):
            pairs += [
                (f"{name} ({version.label})", getattr(new, name.removesuffix("_compiled")), getattr(version, name))
                for name in COMPILED
            ]
    for name, fa, fb in pairs:
        diff = (_logits(fa()) - _logits(fb())).abs().max().item()
        if not diff <= LOGIT_TOL:
            raise AssertionError(f"{name}: logits differ by {diff:.3g} (> {LOGIT_TOL})")
        out[f"{name}: max logit difference"] = diff
    # A random model's logits are near-flat (top probabilities ~1e-3 at the default size), so no
    # position reaches the threshold and each forward commits its most confident one: which one can
    # turn on a last-bit difference between two correct scans. The logits above are the check that
    # both compute the same thing; here the tokens are reported and the work must match.
    want = new.diffusion_eager(new_tokens)
    got = old.diffusion_eager(new_tokens)
    differ = (got.sequences != want.sequences).nonzero()
    out["diffusion tokens equal"] = not len(differ)
    if len(differ):
        out["diffusion first differing position"] = int(differ[0, -1])
        progress(
            f"note: greedy diffusion tokens differ from position {int(differ[0, -1])} (a near-tie; see the logits)"
        )
    if _nfe(got) != _nfe(want):
        raise AssertionError(f"greedy diffusion: {_nfe(got)} denoiser forwards against {_nfe(want)}")
    out["diffusion forwards equal"] = True
    if compiled:
        for version in (new, old):
            nfe = _nfe(version.diffusion_compiled(new_tokens))
            if nfe != _nfe(want):
                raise AssertionError(f"compiled diffusion ({version.label}): {nfe} forwards, eager {_nfe(want)}")
        out["compiled diffusion forwards equal"] = True
    return out


def _nfe(output) -> int:
    """Denoiser forwards of a generation (`stats` is a dataclass now, a dict at older commits)."""
    stats = output.stats
    return int(stats["nfe"] if isinstance(stats, dict) else stats.nfe)


def compare(
    new: Version, old: Version, *, repeats: int, rounds: int, new_tokens: int, compiled: bool
) -> dict[str, dict[str, float]]:
    """ms per forward and diffusion tokens/s of both versions, interleaved; medians over rounds."""
    forwards = FORWARDS + (COMPILED if compiled else ())
    generations = ("diffusion_eager", "diffusion_compiled") if compiled else ("diffusion_eager",)
    samples = {k: {"new": [], "old": []} for k in (*forwards, *generations)}
    for name in forwards:  # warm-up
        for version in (new, old):
            getattr(version, name)()
    for _ in range(rounds):
        for name in forwards:
            for label, version in (("new", new), ("old", old)):
                samples[name][label].append(median_ms(getattr(version, name), repeats))
        for name in generations:
            for label, version in (("new", new), ("old", old)):
                ms = median_ms(functools.partial(getattr(version, name), new_tokens), max(1, repeats // 10))
                samples[name][label].append(1e3 * new_tokens / ms)
    out = {}
    for name, d in samples.items():
        n, o = statistics.median(d["new"]), statistics.median(d["old"])
        if name in generations:
            out[name] = {"new_tokens_per_s": n, "old_tokens_per_s": o, "speedup": n / o}
        else:
            out[name] = {"new_ms": n, "old_ms": o, "speedup": o / n}
    return out


EAGER_TWIN = {"denoise_compiled": "denoise", "commit_compiled": "commit", "diffusion_compiled": "diffusion_eager"}


def projection(results: dict[str, dict[str, float]], peer_ratio: tuple[float, float]) -> dict[str, dict[str, float]]:
    """Projected speed-up over the peer (which ran eagerly), per denoise / commit / diffusion row:
    this code's figure over the baseline's eager one (the same row, or a compiled row's eager twin),
    divided by the peer's measured ratio over the baseline, at its high and low end."""
    lo, hi = peer_ratio
    out = {}
    for name, r in results.items():
        if not name.startswith(("denoise", "commit", "diffusion")):
            continue
        old = results[EAGER_TWIN.get(name, name)]
        if "new_ms" in r:
            vs_baseline = old["old_ms"] / r["new_ms"]
        else:
            vs_baseline = r["new_tokens_per_s"] / old["old_tokens_per_s"]
        out[name] = {
            "vs_baseline_eager": vs_baseline,
            "vs_peer_low": vs_baseline / hi,
            "vs_peer_high": vs_baseline / lo,
            "meets_goal": vs_baseline / hi >= PEER_GOAL,
        }
    return out


def table(results: dict[str, dict[str, float]], projected: dict[str, dict[str, float]]) -> list[str]:
    lines = [
        "| | this code | baseline | speed-up (same mode) | projected vs the peer (eager) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        unit = "ms" if "new_ms" in r else "tokens/s"
        new_v, old_v = (r["new_ms"], r["old_ms"]) if unit == "ms" else (r["new_tokens_per_s"], r["old_tokens_per_s"])
        proj = projected.get(name)
        proj_s = f"{proj['vs_peer_low']:.2f}-{proj['vs_peer_high']:.2f}x" if proj else "-"
        lines.append(f"| {name} ({unit}) | {new_v:.2f} | {old_v:.2f} | {r['speedup']:.2f}x | {proj_s} |")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--baseline", default=DEFAULT_BASELINE, help=f"git revision to compare with (default: {DEFAULT_BASELINE})"
    )
    p.add_argument(
        "--chunk-size", type=int, default=128, help="the model's Mamba scan chunk (default: 128, the release's)"
    )
    p.add_argument("--context", type=int, default=48, help="prompt tokens in the context cache (default: 48)")
    p.add_argument("--block-size", type=int, default=16, help="S (default: 16)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens per diffusion generation (default: 64)")
    p.add_argument("--repeats", type=int, default=30, help="calls per timing (default: 30)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs (default: 0)")
    p.add_argument(
        "--peer-ratio",
        default=f"{PEER_RATIO[0]},{PEER_RATIO[1]}",
        help="the peer's measured speed over the baseline, LOW,HIGH (default: issue 19's 1.14,1.19)",
    )
    p.add_argument(
        "--no-compiled",
        action="store_true",
        help="skip the compiled forwards and diffusion (decode_step='compiled'; compiling takes minutes on 2 cores)",
    )
    p.add_argument("--json", metavar="FILE", help="write settings, agreement and figures as JSON")
    return p


def _check_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[float, float]:
    """Exit with a usage error on a bad option; the peer ratio as (LOW, HIGH)."""
    for name in ("chunk_size", "context", "block_size", "new_tokens", "repeats", "rounds", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        lo, hi = (float(x) for x in args.peer_ratio.split(","))
    except ValueError:
        p.error(f"--peer-ratio: expected LOW,HIGH, got {args.peer_ratio!r}")
    if not 0 < lo <= hi:
        p.error("--peer-ratio: need 0 < LOW <= HIGH")
    return lo, hi


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    peer_ratio = _check_options(p, args)
    if args.json:
        from twotower.cli.options import CLIError, check_output_file

        try:
            check_output_file(args.json, "--json")
        except CLIError as e:
            p.error(str(e))
    torch.set_num_threads(args.threads)
    import twotower
    from twotower.bench.host import describe_host, host_line
    from twotower.bench.random_model import fill_random_
    from twotower.staged_dir import write_text_atomically

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        try:
            old_pkg = import_at_revision(args.baseline, tmp_path)
        except BaselineError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        config = peer_config(twotower, chunk_size=args.chunk_size)
        torch.manual_seed(args.seed)
        model = twotower.TwoTowerForCausalLM(config)
        fill_random_(model, seed=args.seed, std=config.initializer_range)
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp_path / "model")
        del model
        g = torch.Generator().manual_seed(args.seed)
        inputs = {
            "prompt": torch.randint(4, config.vocab_size, (1, args.context), generator=g),
            "block": torch.randint(4, config.vocab_size, (1, args.block_size), generator=g),
            "t": torch.ones(1),
        }
        with torch.inference_mode():
            new = Version("new", twotower, tmp_path / "model", inputs, args.block_size)
            inputs["canvas"] = torch.full((1, args.block_size), new.model.mask_token_id)
            old = Version(old_pkg.__name__, old_pkg, tmp_path / "model", inputs, args.block_size)
            compiled = not args.no_compiled
            if compiled:
                progress("compiling the fixed-shape forwards of both versions ...")
                new.compile()
                old.compile()
            progress("checking that both versions compute the same logits and tokens ...")
            agreement = check_agreement(new, old, args.new_tokens, compiled=compiled)
            progress("timing ...")
            results = compare(
                new, old, repeats=args.repeats, rounds=args.rounds, new_tokens=args.new_tokens, compiled=compiled
            )
    # issue 19's peer ratio is over e3110fa: against another baseline it projects nothing, unless given
    default_ratio = args.peer_ratio == build_parser().get_default("peer_ratio")
    try:
        peer_baseline = f"twotower_at_{short_revision(DEFAULT_BASELINE)}"
    except BaselineError:  # a history without e3110fa: nothing can be its baseline
        peer_baseline = None
    project = not default_ratio or old_pkg.__name__ == peer_baseline
    projected = projection(results, peer_ratio) if project else {}
    print(
        f"{n_params / 1e6:.1f}M parameters, scan chunk {args.chunk_size}, batch 1, {args.threads} thread(s): "
        f"this code against {old_pkg.__name__} (measured, interleaved, medians); "
        + (
            f"the last column is projected through the peer's measured {peer_ratio[0]}-{peer_ratio[1]}x over the baseline"
            if project
            else f"no projection (the peer's measured ratio is over {DEFAULT_BASELINE}; --peer-ratio gives one)"
        )
    )
    print(host_line())
    print("\n".join(table(results, projected)))
    if args.json:
        report = {
            "settings": {**vars(args), "peer_ratio": list(peer_ratio), "parameters": n_params},
            "torch": torch.__version__,
            "host": describe_host(),
            "baseline_module": old_pkg.__name__,
            "agreement": agreement,
            "measured": results,
            "projected_vs_peer": projected,
        }
        write_text_atomically(Path(args.json), json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
