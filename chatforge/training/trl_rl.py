"""`ppo.algorithm: grpo | rloo`: trl's GRPOTrainer / RLOOTrainer with our reward model as the reward function.

Same prompts, same shaped reward as our PPO (normalized score, missing-end penalty; trl adds the KL term
itself with `beta` = `init_kl_coef`), same sampling (temperature only), so runs compare with one knob.
Batch mapping: one generation round samples `batch_size` completions (`batch_size / num_generations`
prompts); each optimizer step takes `minibatch_size` of them; the round is reused `ppo_epochs` times.
"""
from __future__ import annotations

import tempfile

import torch

from chatforge.tokenization import end_of_turn_id
from chatforge.training import ppo_math
from chatforge.training.live import LiveCallback
from chatforge.training.rl import RLParams, make_rollout, sequence_scores


def reward_function(reward_model, tokenizer, params: RLParams, score_mean: float, score_std: float, cast):
    """trl calls it with the prompts, completions and completion ids, plus every extra dataset column
    (here `query_ids`: our own tokenization of the prompt, so scoring sees exactly what PPO's does)."""
    pad_id, end_id = tokenizer.pad_token_id, end_of_turn_id(tokenizer)

    def reward_model_score(prompts, completions, completion_ids, query_ids, **_):
        device = next(reward_model.parameters()).device
        rollout = make_rollout(query_ids, completion_ids, pad_id, end_id, device)
        raw = sequence_scores(reward_model, rollout, cast)
        return ppo_math.shaped_scores(raw, rollout.ended, score_mean, score_std, params.missing_end_penalty).tolist()

    return reward_model_score


def train_with_trl(policy, reward_model, tokenizer, prompts: list[dict], params: RLParams,
                   score_mean: float, score_std: float, cast, live=None):
    """Train `policy` in place with trl's GRPO or RLOO; returns it."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config_class, trainer_class = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}[
        params.algorithm]
    steps_per_generation = params.batch_size // params.minibatch_size
    saved_eos = policy.generation_config.eos_token_id
    policy.generation_config.eos_token_id = end_of_turn_id(tokenizer)  # trl stops at the generation config's eos
    dataset = Dataset.from_list([{"prompt": p["messages"], "query_ids": p["ids"]} for p in prompts])
    with tempfile.TemporaryDirectory(prefix="chatforge-trl-") as scratch:
        args = config_class(
            output_dir=scratch, report_to="none", save_strategy="no", logging_steps=1, seed=params.seed,
            max_steps=params.steps * steps_per_generation * params.ppo_epochs,
            per_device_train_batch_size=params.minibatch_size, steps_per_generation=steps_per_generation,
            num_generations=params.num_generations, num_iterations=params.ppo_epochs,
            max_completion_length=params.max_new_tokens, temperature=params.temperature, top_k=0, top_p=1.0,
            learning_rate=params.learning_rate, max_grad_norm=params.max_grad_norm, beta=params.init_kl_coef,
            epsilon=params.clip_range, bf16=getattr(cast, "fast_dtype", None) == torch.bfloat16,
            disable_dropout=True, use_cpu=not torch.cuda.is_available(),
        )
        trainer = trainer_class(
            model=policy, args=args, train_dataset=dataset, processing_class=tokenizer,
            reward_funcs=reward_function(reward_model, tokenizer, params, score_mean, score_std, cast),
            callbacks=[LiveCallback(live)],
        )
        trainer.train()
    policy = trainer.accelerator.unwrap_model(trainer.model)
    policy.generation_config.eos_token_id = saved_eos
    return policy.eval()
