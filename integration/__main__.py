"""`python -m integration <command>`:

    convert-official --dit FILE [--predictor FILE] --out DIR [--transformer_config config.json] [--overwrite]
        the official DisCa HunyuanVideo 1.0 release -> DIR/restricted_meanflow + DIR/predictor (integration/official.py)
    export-diffusers --export DIR --out DIR [--overwrite]
        a trained stage's export (models.io) -> a diffusers save_pretrained transformer directory

Both write into a temporary sibling directory renamed into place. An existing output directory is replaced
only when it is a previous output of the same command and --overwrite is given; an --out that is, contains
or is inside an input is refused.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m integration", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert-official", help="official DisCa weights -> this project's export directories")
    c.add_argument("--dit", help="hyvideo10_t2v_restricted_meanflow_540p.safetensors")
    c.add_argument("--predictor", help="hyvideo10_t2v_predictor_540p.safetensors")
    c.add_argument("--out", required=True)
    c.add_argument("--transformer_config", help="HunyuanVideo transformer config.json (default: diffusers' 1.0 T2V)")
    c.add_argument("--overwrite", action="store_true", help="replace a previous convert-official output in --out")
    e = sub.add_parser("export-diffusers", help="a stage export -> a diffusers transformer directory")
    e.add_argument("--export", required=True, help="a models.io export directory (e.g. outputs/.../export)")
    e.add_argument("--out", required=True)
    e.add_argument("--overwrite", action="store_true", help="replace a previous export-diffusers output at --out")
    args = p.parse_args(argv)
    try:
        if args.command == "convert-official":
            from integration.official import convert_official

            written = convert_official(args.out, args.dit, args.predictor, args.transformer_config, args.overwrite)
        else:
            from integration.transformer import export_diffusers, is_diffusers_export_dir
            from models.io import check_export_target, load_backbone

            # before the (possibly 26 GB) export is read
            check_export_target(args.out, kind="diffusers export (export-diffusers)", sources=(args.export,),
                                is_same_kind=is_diffusers_export_dir, overwrite=args.overwrite)
            written = {"transformer": export_diffusers(load_backbone(args.export), args.out, args.overwrite)}
    except (ValueError, FileExistsError) as err:  # bad input: a message, not a traceback
        p.error(str(err))
    for name, path in written.items():
        print(f"wrote {name}: {path}")
    return written


if __name__ == "__main__":
    main()
