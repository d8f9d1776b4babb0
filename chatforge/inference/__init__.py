"""Running a trained chat model: from messages to sampled replies. Import each name from the module that defines it.

- `sampling`: `SamplingParams` (params.yaml `generate`), `Row` (one sequence: how it samples, what it drew), the
  per-row sampler `next_tokens`, `token_logprobs`.
- `prompting`: messages → prompt token ids (`prompt_ids`, `fit_history`, `shared_prompt_prefix`), the context
  budget (`context_length`, `prompt_budget`) and the ids that end a reply (`stop_ids`).
- `kv_cache`: `GrowingCache`, the KV cache whose layers grow, join and drop rows in place.
- `packed_attention`: `PACKED_ATTENTION`, joining rows prefilled in the running rows' decode step.
- `batch`: `DecodingBatch`, rows decoded together (continuous batching).
- `generate`: the generation loop: `sample_tokens`, `stream_reply`, `generate_reply(s)`, `generate_from_ids`.
- `loading`: `load_model`, models loaded for inference on `runtime.default_device()`.

Each imports only the ones listed above it (`loading` none of them): no import cycle.
"""
