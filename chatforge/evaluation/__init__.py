"""Evaluation of the models. MODELS: the ones dvc.yaml's evaluate and ifeval matrices run (models/<name>);
`init` is the start of the pipeline as pretrain saved it (model.init with our tokenizer, or the scratch model's
random initialization)."""

MODELS = ("init", "base", "sft", "ppo", "dpo")


def base_is_init(params: dict) -> bool:
    """A pretrained model.init that pretrain does not train (pretrain.max_steps 0) *is* models/base: it is
    evaluated once, as base, and the init's reports say so."""
    from chatforge.pretrained import is_scratch

    model, pretrain = params.get("model") or {}, params.get("pretrain") or {}
    return not is_scratch(model.get("init", "scratch")) and pretrain.get("max_steps") == 0


def model_argument(stage: str) -> str:
    """The model a matrix stage (`python stages/<stage>.py <model>`) was started for; anything else is one line."""
    import sys

    from chatforge.errors import ChatforgeError

    if len(sys.argv) != 2 or sys.argv[1] not in MODELS:
        raise ChatforgeError(f"usage: python stages/{stage}.py {{{','.join(MODELS)}}}")
    return sys.argv[1]


def wrote_init_as_base(stage: str, name: str, params: dict, report, samples) -> bool:
    """For `init` when it is models/base (see base_is_init): write the report that says so (and no samples) and
    return True; otherwise False, and the stage measures the model."""
    from chatforge.console import log, stage_seconds
    from chatforge.files import write_jsonl
    from chatforge.provenance import write_report

    if name != "init" or not base_is_init(params):
        return False
    log(f"{stage}@{name}", f"models/base is model.init itself (pretrain.max_steps 0): {stage}@base measures it")
    write_jsonl(samples, [])
    write_report(report, {"model": name, "same_as": "base", "wall_seconds": stage_seconds(),
                          "note": "pretrain.max_steps is 0: models/base is model.init itself, so base's figures are "
                                  "the init's"})
    return True
