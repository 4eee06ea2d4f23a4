"""Which layer of SmolLM2-135M-Instruct should the shipped heads read? A sweep over depth.

For every decoder layer: the response paths of the HelpSteer sample (chat template, prompt as context,
path from the last prompt position through the response; see METHOD.md) are fitted with ``fit_heads``
(PCA 16, 2x128 MLPs, split by prompt, held-out 20% of prompts) and compared with OU and Brownian motion on
the held-out prompts' responses: NLL in nats/dim and the neural - OU gap with a 95% bootstrap interval over
held-out sequences. Also per layer: the largest path-state norm over the median norm, to show that no
attention-sink position (orders of magnitude larger) is on the modelled path.

One forward pass per batch extracts every layer (one hook per layer). The shipped heads read the layer with
the largest gain among layers without norm outliers, fitted on the whole sample with ``hf-sde fit`` (see the
README, "Results").

    python benchmarks/sweep_layers.py [--smoke | --full] [--layers 0,4,8]
"""

from __future__ import annotations

import argparse

import _common as C
from eval_fit import compare

#: A path whose largest state norm exceeds this multiple of the median holds outlier (sink-like) states.
MAX_NORM_RATIO = 5.0

SETTINGS = {
    "smoke": {"limit": 12, "max_response": 16, "epochs": 1, "boot": 20, "layers": [0, -1]},
    "default": {"limit": 250, "max_response": 256, "epochs": 40, "boot": 1000, "layers": list(range(0, 30, 2)) + [29]},
    "full": {"limit": None, "max_response": 256, "epochs": 60, "boot": 2000, "layers": list(range(30))},
}


def fit_layer(traj, cfg, seed):
    import hf_sde
    from hf_sde.data.loading import SMOLLM2

    return hf_sde.fit_heads(traj, proj_dim=16, epochs=cfg["epochs"], seed=seed, progress=False,
                            base_model=SMOLLM2.name_or_path, base_model_revision=SMOLLM2.revision,
                            gguf_file=SMOLLM2.gguf_file, model_type="llama",
                            data_description={"corpus": "helpsteer_sample_500.jsonl", "template": "helpsteer-chat",
                                              "max_length": cfg["max_response"]})


def norm_ratio(traj) -> float:
    import torch

    norms = torch.cat([s.float().norm(dim=-1) for s in traj.states])
    return float(norms.max() / norms.median())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p)
    p.add_argument("--layers", default=None, help="comma-separated layers (default: the scale's list)")
    args = p.parse_args(argv)
    C.setup_env(args.threads)
    scale = C.scale_of(args)
    cfg = dict(SETTINGS[scale])
    if args.layers:
        cfg["layers"] = [int(x) for x in args.layers.split(",")]
    run = C.Run("sweep_layers", args, cfg)
    per_layer = C.smollm2_response_trajectories(cfg["layers"], cfg["max_response"], cfg["limit"])
    results, rows = {}, []
    for layer, traj in per_layer.items():
        res = fit_layer(traj, cfg, args.seed)
        heads = res.heads
        paths = [heads.project(traj.states[i].float()).detach() for i in range(len(traj))]
        cmp = compare(heads, [paths[i] for i in res.train_indices], [paths[i] for i in res.heldout_indices],
                      cfg["boot"], args.seed)
        cmp.update({"norm_max_over_median": norm_ratio(traj), "best_epoch": res.best_epoch,
                    "epochs_run": len(res.history["train_total"])})
        results[layer] = cmp
        ci = cmp["neural_minus_ou_ci95"]
        rows.append([str(layer), f"{cmp['neural']:.4f}", f"{cmp['ou']:.4f}", f"{cmp['brownian']:.4f}",
                     f"{cmp['neural_minus_ou']:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]",
                     "yes" if cmp["neural_beats_both_ci"] else "no", f"{cmp['norm_max_over_median']:.2f}",
                     f"{res.best_epoch + 1}/{cmp['epochs_run']}"])
        print(" | ".join(rows[-1]), flush=True)
    best = min(results, key=lambda k: results[k]["neural_minus_ou"])
    clean = [k for k in results if results[k]["norm_max_over_median"] < MAX_NORM_RATIO]
    best_clean = min(clean, key=lambda k: results[k]["neural_minus_ou"]) if clean else None
    body = (f"SmolLM2-135M-Instruct, HelpSteer sample responses as chat (path from the last prompt position, "
            f"response <= {cfg['max_response']} tokens), PCA 16, 2x128 MLPs, up to {cfg['epochs']} epochs, split by "
            f"prompt (20% held out). NLL in nats/dim on the held-out prompts' responses; `neural - OU`: bootstrap "
            f"95% CI over held-out sequences ({cfg['boot']} resamples). `max/median norm`: largest path-state norm "
            f"over the median (an attention sink would be >> 10).\n\n"
            + C.md_table(["layer", "neural", "OU", "Brownian", "neural - OU [95% CI]", "beats both (CI)",
                          "max/median norm", "kept epoch/run"], rows)
            + f"\n\nLargest gain over OU: layer {best} ({results[best]['neural_minus_ou']:+.4f} nats/dim). "
            + (f"Largest among layers whose path has no norm outlier (max/median < {MAX_NORM_RATIO:g}): layer "
               f"{best_clean} ({results[best_clean]['neural_minus_ou']:+.4f}).\n" if best_clean is not None else "\n"))
    run.finish({"layers": results, "best_layer": best, "best_layer_without_outliers": best_clean}, body)
    print(body)


if __name__ == "__main__":
    main()
