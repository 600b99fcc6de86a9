"""docs/methods.md, generated from the registries and the config classes, so no list of methods drifts.

    python -m slimkit.catalog --write docs/methods.md     # regenerate
    python -m slimkit.catalog --check docs/methods.md     # exit 1 if it is stale (the test suite does this)

Every table comes from a registry entry's facts (the criterion's ``needs_data``, the method's
``defaults`` and ``paper``, the stage's config fields ...), the way ``--help`` does.
"""

from __future__ import annotations

import argparse
import re
import sys


def _table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows])


def _md(text: str) -> str:
    """reStructuredText roles and literals of docstrings as Markdown code."""
    text = re.sub(r":(?:func|class|mod|data|meth|attr):`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def _first_line(doc: str | None) -> str:
    """The first paragraph of a docstring, on one line."""
    return _md(" ".join((doc or "").strip().split("\n\n")[0].split()))


def stages_section() -> str:
    from .config import describe_fields
    from .pipeline import STAGES, load_stage_modules

    load_stage_modules()
    out = ["## Recipe stages", "",
           "A recipe's `stages:` entries (`method: NAME` plus the options below, and `finetune:` with the "
           "fine-tune options); the same options are the Python configs and the command-line flags.", ""]
    for name in STAGES.names():
        entry = STAGES.get(name)
        out += [f"### `{name}` ({entry.config.__name__})", "", _first_line(entry.run.__doc__), ""]
        if entry.paper:
            out += [f"Papers: {entry.paper.rstrip('.')}.", ""]
        out += [f"Example: `{ {'method': name, **entry.example} }`".replace("'", '"'), ""]
        out += [_table(["option", "type", "default", "meaning"], [list(r) for r in describe_fields(entry.config)]), ""]
    from .pipeline import FinetuneConfig

    out += ["### `finetune:` (FinetuneConfig), after any stage", "",
            _first_line(FinetuneConfig.__doc__), "",
            _table(["option", "type", "default", "meaning"], [list(r) for r in describe_fields(FinetuneConfig)]), ""]
    return "\n".join(out)


def criteria_section() -> str:
    from .prune import CRITERIA

    rows = [[f"`{n}`", "yes" if e.needs_data else "no", "yes" if e.needs_seed else "no", e.reconstruct or "-",
             e.paper] for n, e in ((n, CRITERIA.get(n)) for n in CRITERIA.names())]
    return "\n".join(["## Pruning criteria (`criterion:`, `--criterion`)", "",
                      _table(["name", "needs data", "seeded", "paper's reconstruction", "paper"], rows), ""])


def observers_section() -> str:
    from .quant import OBSERVERS

    rows = [[f"`{n}`", _first_line(OBSERVERS.get(n).__doc__), getattr(OBSERVERS.get(n), "paper", "")]
            for n in OBSERVERS.names()]
    return "\n".join(["## Calibration observers (`observer:`, `--observer`)", "",
                      _table(["name", "range", "paper"], rows), ""])


def distill_section() -> str:
    from .distill import METHODS

    rows = []
    for n in METHODS.names():
        m = METHODS.get(n)
        opts = ", ".join(f"{k}={v!r}" for k, v in m.defaults.items() if k != "loader") or "-"
        rows.append([f"`{n}`", "yes" if m.needs_teacher else "no", opts, m.paper])
    return "\n".join(["## Distillation methods (`distill:`, `--method`, `finetune: {distill: NAME}`)", "",
                      _table(["name", "teacher", "options (defaults)", "paper"], rows), ""])


def transforms_section() -> str:
    from .transform import TRANSFORMS

    rows = []
    for n in TRANSFORMS.names():
        t = TRANSFORMS.get(n)
        opts = ", ".join(f"{k}={v!r}" for k, v in t.defaults.items()) or "-"
        rows.append([f"`{n}`", "/".join(c.__name__ for c in t.types), opts, "yes" if t.uses_data else "no", t.paper])
    return "\n".join(["## Module transforms (`transform:`, `slimkit transform --method`)", "",
                      _table(["name", "replaces", "options (defaults)", "fits on data", "paper"], rows), ""])


def decompositions_section() -> str:
    from .decompose import DECOMPOSITIONS

    rows = [[f"`{n}`", "yes" if DECOMPOSITIONS.get(n).uses_data else "no", DECOMPOSITIONS.get(n).paper]
            for n in DECOMPOSITIONS.names()]
    return "\n".join(["## Decompositions (`decompose` stage `method:`, `slimkit decompose --method`)", "",
                      _table(["name", "needs data", "paper"], rows), ""])


def sparse_section() -> str:
    from .lowbit import METHODS as LOWBIT
    from .sparse import SPARSIFIERS

    rows = [[f"`{n}`", "yes" if SPARSIFIERS.get(n).uses_data else "no",
             "yes" if SPARSIFIERS.get(n).needs_training else "no", SPARSIFIERS.get(n).summary,
             SPARSIFIERS.get(n).paper] for n in SPARSIFIERS.names()]
    low = [[f"`{n}`", LOWBIT.get(n).weights, LOWBIT.get(n).activations, LOWBIT.get(n).default_bits,
            LOWBIT.get(n).paper] for n in LOWBIT.names()]
    return "\n".join(["## Sparsity methods (`sparsify` stage `method:`, `slimkit sparsify --method`)", "",
                      _table(["name", "needs data", "needs training", "what it does", "paper"], rows), "",
                      "## Low-bit methods (`lowbit` stage `method:`, `slimkit lowbit --method`)", "",
                      _table(["name", "weights", "activations (with act_bits)", "default bits", "paper"], low), ""])


def export_section() -> str:
    from .export import FORMATS, RUNTIMES

    fmts = [[f"`{n}`", FORMATS.get(n).suffix, FORMATS.get(n).runtime] for n in FORMATS.names()]
    rts = [[f"`{n}`", FORMATS.get(RUNTIMES.get(n).format).suffix, f"`pip install 'slimkit[{RUNTIMES.get(n).extra}]'`"]
           for n in RUNTIMES.names()]
    return "\n".join(["## Export formats and runtimes (`slimkit export --format`, `slimkit bench --runtime`)", "",
                      _table(["format", "file", "runs in"], fmts), "",
                      _table(["runtime", "runs", "installs with"], rts), ""])


def search_section() -> str:
    from .config import describe_fields
    from .search import PROBLEMS, SAMPLERS, SearchConfig

    samplers = [[f"`{n}`", "yes" if SAMPLERS.get(n).multi_objective else "no", SAMPLERS.get(n).paper]
                for n in SAMPLERS.names()]
    problems = [[f"`{n}`", _first_line(PROBLEMS.get(n).doc)] for n in PROBLEMS.names()]
    return "\n".join(["## Policy search (`slimkit search`, `slimkit.search.SearchConfig`)", "",
                      _first_line(SearchConfig.__doc__), "",
                      _table(["sampler (`--sampler`)", "Pareto front", "paper"], samplers), "",
                      _table(["problem", "what a trial evaluates"], problems), "",
                      _table(["option", "type", "default", "meaning"],
                             [list(r) for r in describe_fields(SearchConfig)]), ""])


def models_section() -> str:
    from .models import MODELS
    from .models.registry import PREFIXES

    rows = [[f"`{n}`", "x".join(map(str, MODELS.get(n).input_size)), MODELS.get(n).num_classes, MODELS.get(n).paper]
            for n in MODELS.names()]
    families = ", ".join(f"`{p}:NAME`" for p in PREFIXES.names())
    return "\n".join(["## Models (`create_model(NAME)`, every command's MODEL)", "",
                      f"Also reached by prefix: {families}; your own builder as `PATH.py:fn`; any artifact path.", "",
                      _table(["name", "input", "classes", "paper"], rows), ""])


def training_section() -> str:
    from .train import OPTIMIZERS, SCHEDULES

    return "\n".join(["## Training (`optimizer:`, `schedule:`)", "",
                      f"Optimizers: {', '.join(f'`{n}`' for n in OPTIMIZERS.names())}. "
                      f"Schedules: {', '.join(f'`{n}`' for n in SCHEDULES.names())}.", ""])


def catalog_markdown() -> str:
    """The whole of docs/methods.md."""
    head = ("# Methods, generated\n\nWritten by `python -m slimkit.catalog --write docs/methods.md` from the "
            "registries and the config classes; the test suite fails when it is stale. Each section is what a "
            "recipe key or a command-line flag accepts.\n")
    return "\n".join([head, stages_section(), criteria_section(), observers_section(), distill_section(),
                      transforms_section(), decompositions_section(), sparse_section(), export_section(),
                      search_section(),
                      training_section(), models_section()]).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slimkit.catalog", description=__doc__.splitlines()[0])
    group = p.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="PATH", help="write the catalogue to PATH")
    group.add_argument("--check", metavar="PATH", help="exit 1 if PATH differs from the catalogue")
    args = p.parse_args(argv)
    text = catalog_markdown()
    if args.write:
        from .artifact import atomic_write_text

        atomic_write_text(args.write, text)
    elif args.check:
        with open(args.check, encoding="utf-8") as f:
            if f.read() != text:
                print(f"{args.check} is stale: run python -m slimkit.catalog --write {args.check}", file=sys.stderr)
                return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
