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


def same_as_base(name: str) -> dict:
    """The report of `init` when it is models/base (see base_is_init)."""
    return {"model": name, "same_as": "base",
            "note": "pretrain.max_steps is 0: models/base is model.init itself, so base's figures are the init's"}
