"""``lora label DIR --model CLIP_DIR``: auto-label a folder of images (CLIP zero-shot tags,
optional BLIP captions) into ``metadata.csv`` or ``.txt`` sidecars. Local models only.

Runs as: whoever runs ``lora``: the user (trusted commands act as this account in local mode, or
ask the runner service).
"""
from __future__ import annotations


def cmd_label(args) -> int:
    from lora_kernel.training.label import label_folder
    result = label_folder(
        args.dir, args.model, vocab=args.vocab, trigger=args.trigger, fmt=args.format,
        threshold=args.threshold, top_k=args.top_k, batch_size=args.batch_size,
        overwrite=args.overwrite, caption_model=args.caption_model, template=args.template,
        device=args.device, progress=not args.quiet)
    if args.show:
        for rel, text in result.captions.items():
            print(f"{rel}: {text}")
    for rel, why in result.failed:
        print(f"warning: {rel}: not labelled ({why})")
    print(f"{len(result.labelled)} labelled, {len(result.skipped)} already captioned (skipped), "
          f"{len(result.failed)} unreadable -> {result.output}")
    return 0


def register(sub) -> None:
    """Add ``label`` to the ``lora`` CLI."""
    from lora_kernel.training.label import DEFAULT_TEMPLATE, DEFAULT_VOCAB, FORMATS

    p = sub.add_parser(
        "label", help="auto-label images with a local CLIP model (tags) into captions",
        description="CLIP zero-shot tagging over a tag vocabulary, optionally with captions "
                    "from a local BLIP model; writes metadata.csv (file_name,text) or kohya "
                    ".txt sidecars. Resumable: images already captioned are skipped unless "
                    "--overwrite. Models load from local .safetensors folders only.")
    p.add_argument("dir", help="image folder")
    p.add_argument("--model", required=True, metavar="CLIP_DIR",
                   help="local CLIP model folder (config.json, *.safetensors, tokenizer, "
                        "preprocessor_config.json)")
    p.add_argument("--vocab", default=None, metavar="TAGS_TXT",
                   help=f"tag vocabulary, one per line (default {DEFAULT_VOCAB})")
    p.add_argument("--trigger", default=None, metavar="WORD",
                   help="trigger word put first in every caption")
    p.add_argument("--format", choices=FORMATS, default="csv",
                   help="csv: metadata.csv (default); txt: <stem>.txt next to each image")
    p.add_argument("--threshold", type=float, default=0.02,
                   help="minimum tag probability (softmax over the vocabulary; default 0.02)")
    p.add_argument("--top-k", type=int, default=8, help="at most this many tags (default 8)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--overwrite", action="store_true",
                   help="label images that already have a caption too")
    p.add_argument("--caption-model", default=None, metavar="BLIP_DIR",
                   help="local BLIP captioning model: its caption goes after the trigger")
    p.add_argument("--template", default=DEFAULT_TEMPLATE,
                   help=f"prompt each tag is scored with (default {DEFAULT_TEMPLATE!r})")
    p.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    p.add_argument("--show", action="store_true", help="print every new caption")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_label)
