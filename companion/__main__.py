"""Command line: ``python -m companion book {list,run,html}``, ``pipeline run`` and
``bands {run,make,check}``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m companion {book,pipeline,bands} ...\n\n"
              "  book list [--profile NAME]           chapters and their parameters\n"
              "  book run [CHAPTER ...] [--profile NAME] [-p KEY=VALUE ...]\n"
              "                                       execute chapters with papermill\n"
              "  book html [--profile NAME]           render executed chapters to HTML\n"
              "  pipeline run [--profile NAME] [-p KEY=VALUE ...] [--checkpoint-every STEPS]\n"
              "                                       the 3.4 pipeline, resumable; also under\n"
              "                                       torchrun --nproc_per_node N -m companion\n"
              "  bands run NAME [-p KEY=VALUE ...]    a variation run of the book (own cache)\n"
              "  bands make REFERENCE VARIATION ...   re-make tests/reference_metrics.json\n"
              "  bands check RUN_DIR                  a run's metrics against that file")
        return 0 if argv else 2
    # each command imports only what it needs: `book list` starts without torch
    if argv[0] == "book":
        from companion.book import main_book

        return main_book(argv[1:])
    if argv[0] == "pipeline":
        from companion.launch import main_pipeline

        return main_pipeline(argv[1:])
    if argv[0] == "bands":
        from companion.bands import main_bands

        return main_bands(argv[1:])
    print(f"unknown command {argv[0]!r}; try `python -m companion --help`", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
