"""`dgq quantize`: every stage in order, each skipped when its artifacts are current; refuses
before any work starts what would fail or destroy data later (output paths, export format)."""

from __future__ import annotations

from pathlib import Path

from ..artifacts import claim_output_dir, written_by_dgq
from ..errors import DGQError
from ..models.load import local_model_dir, resolve
from .calibrate import calibrate
from .graph import Context
from .pack import pack, pack_is_current, packed_here
from .search import search
from .smooth import smooth
from .verify import verify


def export_target(output: Path, fmt: str) -> Path:
    return output.with_name(f"{output.name}-{fmt}")


def protected_paths(model_spec: str | None, work: Path | None) -> dict[str, Path]:
    """What no output may be or contain: where the user stands, the model, the stage artifacts."""
    paths = {"the current directory": Path.cwd()}
    model_dir = local_model_dir(model_spec) if model_spec else None
    if model_dir is not None:
        paths["the model directory"] = model_dir
    if work is not None:
        paths["the work directory"] = work
    return paths


def preflight(model_spec: str, output: Path, work: Path, force: bool, export: str | None) -> None:
    """Everything about the outputs that would fail (or destroy data) later, checked now."""
    from ..export import FORMATS
    from ..format import MANIFEST

    resolve(model_spec)
    protected = protected_paths(model_spec, work)
    claim_output_dir(output, MANIFEST, replace=force or packed_here(work, output), protected=protected)
    if export is not None:
        if export not in FORMATS:
            raise DGQError(f"--export must be one of {', '.join(FORMATS)}; got '{export}'")
        target = export_target(output, export)
        claim_output_dir(target, MANIFEST, replace=written_by_dgq(target, MANIFEST),
                         protected=protected, option="--export target")


def quantize(ctx: Context, model_spec: str, output: Path, run_verify: bool = True, export: str | None = None) -> dict:
    """All stages in order (the caller ran preflight() before creating the work directory).
    Returns a run summary."""
    manifests = {"calibrate": calibrate(ctx, model_spec, planned_group=ctx.recipe.group), "smooth": smooth(ctx),
                 "search": search(ctx)}
    if pack_is_current(ctx, output):
        ctx.reporter.info(f"pack: {output} is up to date, skipped")
    else:
        pack(ctx, output)
    manifests["pack"] = ctx.manifest("pack")
    summary = {
        "model": model_spec, "output": str(output.resolve()), "work": str(ctx.work.resolve()),
        "stages": {name: {"outputs": m.get("outputs", {}) | m.get("checkpoint", {}),
                          "seconds": (m.get("resources") or {}).get("seconds")} for name, m in manifests.items()},
        "recipe": manifests["search"].get("options", {}),
    }
    if run_verify:
        checks = verify(output, ctx.work, None, ctx.reporter)
        summary["verify"] = [{"check": c.name, "passed": c.passed, "detail": c.detail} for c in checks]
    if export:
        from ..export import export_checkpoint

        target = export_target(output, export)
        summary["export"] = export_checkpoint(output, target, export, force=True)
        ctx.reporter.info(f"export: wrote {target} ({export})")
    return summary
