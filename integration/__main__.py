"""`python -m integration <command>`:

    convert-official --dit FILE [--predictor FILE] --out DIR [--transformer_config config.json]
        the official DisCa HunyuanVideo 1.0 release -> DIR/restricted_meanflow + DIR/predictor (integration/official.py)
    export-diffusers --export DIR --out DIR
        a trained stage's export (models.io) -> a diffusers save_pretrained transformer directory
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
    e = sub.add_parser("export-diffusers", help="a stage export -> a diffusers transformer directory")
    e.add_argument("--export", required=True, help="a models.io export directory (e.g. outputs/.../export)")
    e.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.command == "convert-official":
        from integration.official import convert_official

        written = convert_official(args.out, args.dit, args.predictor, args.transformer_config)
    else:
        from integration.transformer import export_diffusers
        from models.io import load_backbone

        written = {"transformer": export_diffusers(load_backbone(args.export), args.out)}
    for name, path in written.items():
        print(f"wrote {name}: {path}")
    return written


if __name__ == "__main__":
    main()
