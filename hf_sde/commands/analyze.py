"""``hf-sde analyze``: write the analysis report (HTML, metrics.json, figures) for fitted heads."""

from __future__ import annotations

import json
import os

from . import _cache, _model
from ._args import nonnegative_int, open_fraction, positive_int, template_choices, template_help
from ._output import atomic_output_dir, check_output_dir

HELP = "write the analysis report (HTML, metrics.json, figures) for fitted heads"
SMOKE = {"limit": 8, "n_paths": 2, "max_starts": 4, "max_samples": 300, "examples": 1, "max_length": 64}


def add_arguments(p) -> None:
    p.add_argument("--heads", required=True, help="folder or hub id of fitted SDE heads")
    _model.add_model_args(p, from_heads=True)
    p.add_argument("--batch-size", type=positive_int, default=8, help="extraction batch size")
    p.add_argument("--data", default=None,
                   help="corpus: .txt/.jsonl/.json/.csv/.parquet file or hub dataset id (default: none, required "
                        "unless --trajectories names the corpus its paths came from)")
    p.add_argument("--template", default=None, choices=template_choices(), metavar="TEMPLATE",
                   help=template_help(note="; use the template the heads were fitted with"))
    p.add_argument("--text-column", default=None,
                   help="column holding the text when there is no --template (default: text)")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N documents (default: all)")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="token truncation (default: as the heads were fitted)")
    _cache.add_no_cache(p)
    _cache.add_trajectories(p, "instead of extracting them (at the heads' layer; the data options not given are "
                               "the folder's, those given must match it; the corpus is still read for its tokens)")
    p.add_argument("--history", default=None, help="fit_history.json (default: the one next to the heads)")
    p.add_argument("--heldout-fraction", type=open_fraction, default=0.2,
                   help="held-out share when the fit's own split cannot be recovered")
    p.add_argument("--n-paths", type=positive_int, default=4, help="simulated paths per held-out start")
    p.add_argument("--max-starts", type=positive_int, default=64, help="held-out start states to simulate from")
    p.add_argument("--method", default="euler", choices=["euler", "milstein", "srk"],
                   help="simulation scheme (milstein/srk need pip install hf-sde[sde])")
    p.add_argument("--examples", type=nonnegative_int, default=3, help="held-out texts shown with per-token z-scores")
    p.add_argument("--max-samples", type=positive_int, default=4000, help="data points for the theory checks")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the split and the simulations")
    p.add_argument("--out", required=True,
                   help="output folder for index.html, metrics.json and the figures (new or empty, else --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is not empty")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def interrupted(args) -> str:
    return f"hf-sde analyze: interrupted (Ctrl-C) before the report was finished; nothing was written to {args.out}."


def _load_history(heads_path: str, explicit: str | None):
    """``fit_history.json`` beside the heads (folder or hub repo), if there is one (it is optional)."""
    if explicit:
        return explicit
    local = os.path.join(heads_path, "fit_history.json")
    if os.path.isfile(local):
        return local
    if os.path.isdir(heads_path):
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return hf_hub_download(heads_path, "fit_history.json")
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError):
        return None


def _check_out(args) -> None:
    if os.path.isdir(args.heads) and os.path.exists(args.out) and os.path.samefile(args.heads, args.out):
        raise ValueError(f"--out {args.out} is the --heads folder; write the report to another folder.")


def check_args(args) -> None:
    if args.data is None and args.trajectories is None:
        raise ValueError("analyze needs --data (the corpus) or --trajectories FOLDER (from hf-sde extract).")


def _from_folder(args, model, tokenizer, heads):
    """The paths of ``--trajectories`` at the heads' layer; the data options default to the folder's."""
    from ..trajectories import cache as tc

    traj, manifest = tc.load_for_model(args.trajectories, model, tokenizer, heads.config.layer,
                                       "the heads' layer")
    _cache.adopt_corpus_options(args, manifest, args.trajectories)
    if args.data is None:
        args.data = (manifest.get("corpus") or {}).get("data")
    if not args.data or args.data == "<list>":
        raise ValueError(f"--trajectories {args.trajectories} records no corpus file; pass --data (the corpus it "
                         "was extracted from: analyze reads its tokens).")
    from ..data.corpus import load_texts

    docs, groups = load_texts(args.data, template=args.template, text_column=args.text_column, limit=args.limit,
                              return_groups=True)
    tc.check_corpus(manifest, args.trajectories, docs, groups, args.max_length,
                    (manifest.get("key") or {}).get("max_context"))
    return traj


def run(args) -> int:
    from ..analysis.report import build_report, verdicts
    from ..fitting.heads import SDEHeads

    check_args(args)
    _check_out(args)
    check_output_dir(args.out, args.overwrite)  # before the slow part
    heads = SDEHeads.from_pretrained(args.heads)
    model, tokenizer = _model.load_model_from_args(args, heads.config)
    history = _load_history(args.heads, args.history)
    trajectories = _from_folder(args, model, tokenizer, heads) if args.trajectories else None
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        metrics = build_report(
            model, tokenizer, heads, args.data, str(tmp), template=args.template, max_length=args.max_length,
            history=history, text_column=args.text_column, limit=args.limit,
            heldout_fraction=args.heldout_fraction, seed=args.seed, n_paths=args.n_paths,
            max_starts=args.max_starts, method=args.method, n_examples=args.examples,
            max_samples=args.max_samples, batch_size=args.batch_size, progress=not args.quiet,
            cache=_cache.cache_flag(args), trajectories=trajectories,
        )
    sim = metrics["simulation"]
    said = verdicts(metrics)  # the same sentences as the HTML report
    if args.json:
        print(json.dumps({"out": args.out, "heldout_nll": metrics["heldout_nll"],
                          "sliced_wasserstein": sim["sliced_wasserstein"],
                          "neural_closer_than_ou": sim["neural_closer_than_ou"],
                          "neural_ou_gap_within_noise": sim["neural_ou_gap_within_noise"],
                          "verdicts": said}))
    else:
        print(f"Report written to {os.path.join(args.out, 'index.html')} ({metrics['runtime_s']:.1f} s).")
        print(said["nll"])
        print(said["simulation"])
    return 0
