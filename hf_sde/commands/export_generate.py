"""``hf-sde export-generate``: write a ``custom_generate`` folder for use without installing hf-sde."""

from __future__ import annotations

from ._output import atomic_output_dir

HELP = "write a custom_generate folder for use without installing hf-sde"


def add_arguments(p) -> None:
    p.add_argument("out", help="folder to create (new or empty, else --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is not empty")


def run(args) -> int:
    from ..serving.export import export_custom_generate

    with atomic_output_dir(args.out, args.overwrite) as tmp:
        export_custom_generate(str(tmp))
    print(f"Wrote {args.out}/custom_generate. Push {args.out} to a Hub repo, then: "
          f"model.generate(..., custom_generate='<repo or {args.out}>', trust_remote_code=True, sde_control=...)")
    return 0
