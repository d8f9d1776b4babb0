"""The sampling loop: greedy = argmax decoding, cache = no cache, batching = one at a time, stops, streaming;
the per-row sampler, and rows that join and leave a running batch drawing what they draw alone."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

from chatforge.errors import ChatforgeError
from chatforge.inference import kv_cache, packed_attention
from chatforge.inference.batch import DecodingBatch
from chatforge.inference.sampling import Row
from chatforge.inference.generate import generate_replies, generate_reply, sample_tokens, stream_reply
from chatforge.inference.loading import load_model
from chatforge.inference.prompting import fit_history, prompt_ids, shared_prompt_prefix, stop_ids
from chatforge.inference.sampling import SamplingParams, _penalize, next_tokens
from chatforge.params import section
from chatforge.tokenization import end_of_turn_id
from conftest import make_loud_llama

GREEDY = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=12)
QUESTIONS = ["What is your favorite food?", "Hi", "Can you tell me a joke about the weather in the park?", "Why?"]


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: thread hand-offs cost more than they save (25x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return make_loud_llama(tiny_tokenizer)


class ScriptedModel(torch.nn.Module):
    """Puts all probability on a scripted token per row and step, whatever the input (stop/stream tests).

    Rows leave the batch as they stop, so each row's script number and prompt length ride along in its KV
    cache, which the batch pads and indexes together with the row (as it does a real model's keys)."""

    def __init__(self, script: list[list[int]], vocab_size: int, context: int = 128, background: float = 0.0):
        super().__init__()
        self.script, self.background = script, background
        self.config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=context, num_hidden_layers=1)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the loop a device

    def forward(self, input_ids, attention_mask, past_key_values, **_):
        if past_key_values.get_seq_length() == 0:  # prefill: row i follows script i
            script_rows, prompt_lengths = torch.arange(len(input_ids)).float(), attention_mask.sum(-1).float()
        else:
            keys, values, _ = next(iter(past_key_values))
            script_rows, prompt_lengths = keys[:, 0, -1, 0], values[:, 0, -1, 0]
        shape = (len(input_ids), 1, input_ids.shape[1], 1)
        past_key_values.update(script_rows[:, None, None, None].expand(shape),
                               prompt_lengths[:, None, None, None].expand(shape), 0)
        steps = (attention_mask.sum(-1) - prompt_lengths).long().tolist()
        logits = torch.full((len(input_ids), 1, self.config.vocab_size), self.background)
        for i, (row, step) in enumerate(zip(script_rows.long().tolist(), steps)):
            tokens = self.script[row]
            logits[i, 0, tokens[min(step, len(tokens) - 1)]] = 1.0 if self.background else 10.0
        return SimpleNamespace(logits=logits)


def argmax_decode_without_cache(model, ids: list[int], steps: int, stop: list[int]) -> list[int]:
    """The textbook reference: re-run the whole sequence, take the argmax, until a stop token."""
    sequence, generated = list(ids), []
    with torch.no_grad():
        for _ in range(steps):
            next_id = int(model(torch.tensor([sequence])).logits[0, -1].argmax())
            generated.append(next_id)
            if next_id in stop:
                break
            sequence.append(next_id)
    return generated


def test_greedy_is_deterministic_and_equals_argmax_decoding(model, tiny_tokenizer):
    for question in QUESTIONS[:2]:
        reply = generate_reply(model, tiny_tokenizer, ask(question), GREEDY)
        again = generate_reply(model, tiny_tokenizer, ask(question), GREEDY)
        expected = argmax_decode_without_cache(
            model, prompt_ids(tiny_tokenizer, ask(question)), GREEDY.max_new_tokens, stop_ids(tiny_tokenizer)
        )
        assert reply.token_ids == again.token_ids == expected
        assert len(set(expected)) > 3  # a real sequence, not one token repeated


def test_cached_and_uncached_loops_pick_the_same_tokens(model, tiny_tokenizer):
    rows = [prompt_ids(tiny_tokenizer, ask(q)) for q in QUESTIONS]
    sampling = SamplingParams(temperature=0, repetition_penalty=1.3, max_new_tokens=16)
    stop, pad = stop_ids(tiny_tokenizer), tiny_tokenizer.pad_token_id
    cached = torch.stack(list(sample_tokens(model, rows, sampling, stop, pad, use_cache=True)))
    uncached = torch.stack(list(sample_tokens(model, rows, sampling, stop, pad, use_cache=False)))
    assert torch.equal(cached, uncached)


def test_top_k_1_and_tiny_top_p_equal_greedy(model, tiny_tokenizer):
    greedy = generate_reply(model, tiny_tokenizer, ask("Hi"), GREEDY).token_ids
    for knobs in ({"top_k": 1}, {"top_k": 0, "top_p": 1e-6}):
        sampling = SamplingParams(temperature=1.0, repetition_penalty=1.0, max_new_tokens=12, **knobs)
        assert generate_reply(model, tiny_tokenizer, ask("Hi"), sampling, seed=123).token_ids == greedy


def test_seed_makes_sampling_reproducible(model, tiny_tokenizer):
    sampling = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=20)
    first = generate_reply(model, tiny_tokenizer, ask("Hi"), sampling, seed=7).token_ids
    assert generate_reply(model, tiny_tokenizer, ask("Hi"), sampling, seed=7).token_ids == first
    others = {tuple(generate_reply(model, tiny_tokenizer, ask("Hi"), sampling, seed=s).token_ids) for s in (8, 9)}
    assert tuple(first) not in others


def test_stops_at_end_of_turn_per_row(tiny_tokenizer):
    end = end_of_turn_id(tiny_tokenizer)
    hello, there = tiny_tokenizer.encode("Hello"), tiny_tokenizer.encode(" there")
    script = [hello + [end, *there], hello + there + [end], there * 20]
    model = ScriptedModel(script, len(tiny_tokenizer))
    sampling = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=8)
    replies = generate_replies(model, tiny_tokenizer, [ask("a"), ask("bb"), ask("ccc")], sampling)
    assert [r.text for r in replies[:2]] == ["Hello", "Hello there"]
    assert replies[0].token_ids == hello + [end] and replies[0].ended
    assert replies[1].token_ids == hello + there + [end] and replies[1].ended
    assert len(replies[2].token_ids) == 8 and not replies[2].ended


def test_streaming_holds_back_split_characters(tiny_tokenizer):
    text = "héllo 世界 🙂 ok"
    ids = tiny_tokenizer.encode(text)
    assert len(ids) > len(text)  # multi-byte characters span several byte-level tokens
    model = ScriptedModel([ids + [end_of_turn_id(tiny_tokenizer)]], len(tiny_tokenizer))
    sampling = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=64)
    pieces = list(stream_reply(model, tiny_tokenizer, ask("emoji?"), sampling))
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert "世" in pieces and "🙂" in pieces  # whole characters, each once its last byte arrived


def test_stream_pieces_concatenate_to_the_reply(model, tiny_tokenizer):
    sampling = SamplingParams(temperature=0.8, max_new_tokens=24)
    pieces = list(stream_reply(model, tiny_tokenizer, ask("Hi"), sampling, seed=3))
    reply = generate_reply(model, tiny_tokenizer, ask("Hi"), sampling, seed=3)
    assert len(pieces) > 1
    assert "".join(pieces) == reply.text == tiny_tokenizer.decode(reply.token_ids, skip_special_tokens=True)


def test_batched_left_padded_replies_equal_one_at_a_time(model, tiny_tokenizer):
    sampling = SamplingParams(temperature=0, repetition_penalty=1.2, max_new_tokens=12)
    conversations = [ask(q) for q in QUESTIONS]
    batched = generate_replies(model, tiny_tokenizer, conversations, sampling, batch_size=3)
    alone = [generate_reply(model, tiny_tokenizer, c, sampling) for c in conversations]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert [r.text for r in batched] == [r.text for r in alone]


# (question, sampling, seed, the step at which the row joins the running batch)
CONTINUOUS_PLAN = [
    (0, SamplingParams(temperature=0, repetition_penalty=1.2, max_new_tokens=20), None, 0),
    (1, SamplingParams(temperature=1.0, top_k=0, top_p=0.9, repetition_penalty=1.0, max_new_tokens=12), 11, 0),
    (2, SamplingParams(temperature=0.7, top_k=20, top_p=1.0, repetition_penalty=1.3, max_new_tokens=24), 12, 3),
    (3, SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=6), None, 4),
    (0, SamplingParams(temperature=1.3, top_k=5, top_p=0.95, max_new_tokens=16), 13, 4),
]


def decode_continuously(model, tokenizer, plan, batch_sizes: list, prefix: list[int] = ()) -> list[Row]:
    """Run `plan` on one DecodingBatch as the serve engine does: rows join in their step's forward pass (a packed
    step), leave when done."""
    batch = DecodingBatch(model, tokenizer.pad_token_id, stop_ids(tokenizer), tokenizer.all_special_ids,
                          prefix=prefix)
    rows = [Row(prompt_ids(tokenizer, ask(QUESTIONS[question])), sampling, seed)
            for question, sampling, seed, _ in plan]
    step = 0
    while step <= max(join for *_, join in plan) or len(batch):
        joining = [row for row, (*_, join) in zip(rows, plan) if join == step]
        batch_sizes.append(len(batch) + len(joining))
        batch.step(joining=joining)
        step += 1
    return rows


def test_rows_joining_and_leaving_a_batch_draw_what_they_draw_alone(model, tiny_tokenizer, monkeypatch):
    logits_seen: dict[int, list[torch.Tensor]] = {}

    def recording(logits, rows, seen_ids):
        for row, row_logits in zip(rows, logits):
            logits_seen.setdefault(id(row), []).append(row_logits.clone())
        return next_tokens(logits, rows, seen_ids)

    monkeypatch.setattr("chatforge.inference.batch.next_tokens", recording)  # the name the batch calls
    batch_sizes: list[int] = []
    together = decode_continuously(model, tiny_tokenizer, CONTINUOUS_PLAN, batch_sizes)
    alone = [decode_continuously(model, tiny_tokenizer, [(*entry[:3], 0)], [])[0]
             for entry in CONTINUOUS_PLAN]
    assert max(batch_sizes) == len(CONTINUOUS_PLAN) and batch_sizes[-1] == 1  # rows really joined and left
    assert model.config._attn_implementation == packed_attention.PACKED_ATTENTION  # and joined in packed steps
    assert [row.tokens for row in together] == [row.tokens for row in alone]  # greedy and seeded rows alike
    assert all(row.ended or len(row.tokens) == entry[1].max_new_tokens for row, entry in zip(together, CONTINUOUS_PLAN))
    # The logits themselves agree to fp32 rounding, not bit for bit: a batch runs other matmul shapes.
    for batched, single in zip(together, alone):
        for a, b in zip(logits_seen[id(batched)], logits_seen[id(single)]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_steps_with_grouped_query_attention_draw_what_rows_draw_alone(tiny_tokenizer, attention):
    """SmolLM2's attention shares each key/value head between query heads; a prefix is cached. A model whose
    attention is not SDPA cannot pack: its joining rows are prefilled on their own, with the same tokens."""
    model = make_loud_llama(tiny_tokenizer, kv_heads=1)
    model.set_attn_implementation(attention)
    prefix = shared_prompt_prefix(tiny_tokenizer)
    together = decode_continuously(model, tiny_tokenizer, CONTINUOUS_PLAN, [], prefix)
    alone = [decode_continuously(model, tiny_tokenizer, [(*entry[:3], 0)], [], prefix)[0] for entry in CONTINUOUS_PLAN]
    assert [row.tokens for row in together] == [row.tokens for row in alone]
    packs = attention == "sdpa"
    assert (model.config._attn_implementation == packed_attention.PACKED_ATTENTION) == packs


def test_a_row_removed_mid_batch_leaves_the_others_drawing_what_they_draw_alone(model, tiny_tokenizer):
    """As a cancelled request: `remove` of a row in the middle (outside inference mode, as the engine calls it)
    moves the last row into its place, and every row left goes on as it would alone."""
    sampling = SamplingParams(temperature=0, repetition_penalty=1.2, max_new_tokens=10)

    def rows():
        return [Row(prompt_ids(tiny_tokenizer, ask(question)), sampling, ignore_eos=True) for question in QUESTIONS]

    def new_batch():
        tokenizer = tiny_tokenizer
        return DecodingBatch(model, tokenizer.pad_token_id, stop_ids(tokenizer), tokenizer.all_special_ids)

    alone = []
    for row in rows():
        batch = new_batch()
        batch.add([row])
        while len(batch):
            batch.step()
        alone.append(row.tokens)
    together = rows()
    batch = new_batch()
    batch.add(together)
    batch.step()
    batch.remove([together[1]])
    assert batch.rows[1] is together[-1]  # the last row took the leaving row's place
    while len(batch):
        batch.step()
    stayed = [i for i in range(len(together)) if i != 1]
    assert [together[i].tokens for i in stayed] == [alone[i] for i in stayed]
    assert len(together[1].tokens) == 2


def test_a_cached_prompt_prefix_changes_no_token(model, tiny_tokenizer):
    prefix = shared_prompt_prefix(tiny_tokenizer)
    assert tiny_tokenizer.convert_ids_to_tokens(prefix) == ["<|bos|>", "<|user|>"]
    assert prompt_ids(tiny_tokenizer, ask("Why?"))[: len(prefix)] == prefix
    plain = decode_continuously(model, tiny_tokenizer, CONTINUOUS_PLAN, [])
    cached = decode_continuously(model, tiny_tokenizer, CONTINUOUS_PLAN, [], prefix)
    assert [row.tokens for row in cached] == [row.tokens for row in plain]


def test_sampler_honours_each_rows_settings():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]] * 5)
    seen_ids = torch.tensor([[-1, -1]] * 4 + [[0, 0]])  # row 4 has seen token 0, twice: penalized once
    rows = [Row([1], SamplingParams(temperature=0)),
            Row([1], SamplingParams(temperature=1.0, top_k=2, top_p=1.0), seed=0),
            Row([1], SamplingParams(temperature=1.0, top_k=0, top_p=0.8), seed=1),  # probs .64 .23 .09 …
            Row([1], SamplingParams(temperature=1.0, top_k=0, top_p=1.0), seed=2),
            Row([1], SamplingParams(temperature=0, repetition_penalty=100.0))]
    draws = torch.stack([next_tokens(logits, rows, seen_ids) for _ in range(300)]).T.tolist()
    assert set(draws[0]) == {0} and set(draws[1]) == {0, 1} and set(draws[2]) == {0, 1}
    assert len(set(draws[3])) >= 4 and set(draws[4]) == {1}  # the penalty moved the greedy row off token 0
    again = [Row([1], row.sampling, seed) for row, seed in zip(rows, (None, 0, 1, 2, None))]
    assert torch.stack([next_tokens(logits, again, seen_ids) for _ in range(300)]).T.tolist() == draws


def test_repetition_penalty_applies_once_per_seen_token_as_a_dense_mask_would():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=generator) * 4
    seen_ids = torch.tensor([[5, 5, -1, 7, 0], [-1, -1, -1, -1, -1], [49, 3, 3, 3, 12]])  # repeats and gaps
    penalty = torch.tensor([1.3, 2.0, 0.5])
    seen = torch.zeros_like(logits, dtype=torch.bool)
    for row, ids in enumerate(seen_ids.tolist()):
        seen[row, [i for i in ids if i >= 0]] = True
    dense = torch.where(seen, torch.where(logits > 0, logits / penalty[:, None], logits * penalty[:, None]), logits)
    assert torch.equal(_penalize(logits, seen_ids, penalty), dense)


def test_fit_history_drops_oldest_exchanges_keeps_system(tiny_tokenizer):
    system = {"role": "system", "content": "You are kind."}
    exchanges = [
        [{"role": "user", "content": f"Question {i} about food?"}, {"role": "assistant", "content": f"Answer {i}."}]
        for i in range(4)
    ]
    messages = [system] + [turn for exchange in exchanges for turn in exchange] + ask("Last one?")
    kept, dropped = fit_history(tiny_tokenizer, messages, 10_000)
    assert (kept, dropped) == (messages, 0)
    budget = len(prompt_ids(tiny_tokenizer, [system, *exchanges[3], *ask("Last one?")]))
    kept, dropped = fit_history(tiny_tokenizer, messages, budget)
    assert kept == [system, *exchanges[3], *ask("Last one?")]
    assert dropped == 6
    with pytest.raises(ChatforgeError, match="too long"):
        fit_history(tiny_tokenizer, messages, 3)


def test_prompt_longer_than_the_context_is_a_clear_error(model, tiny_tokenizer):
    with pytest.raises(ChatforgeError, match="fit_history"):
        generate_reply(model, tiny_tokenizer, ask("word " * 200), GREEDY)


def test_load_model_names_the_stage_to_run(tmp_path, tiny_model_dir):
    with pytest.raises(ChatforgeError, match=r"no such model directory; run `dvc repro ppo`"):
        load_model(tmp_path / "missing", stage_hint="ppo")
    half_built = tmp_path / "half"
    half_built.mkdir()
    (half_built / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(ChatforgeError, match=r"no model weights .*; run `dvc repro sft`") as error:
        load_model(half_built)
    assert "\n" not in str(error.value)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model_dir / name).exists():
            (half_built / name).write_bytes((tiny_model_dir / name).read_bytes())
    (half_built / "model.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ChatforgeError, match=r"cannot load the model \(.*\); run `dvc repro sft`"):
        load_model(half_built)  # weights cut off mid-write
    model, tokenizer = load_model(tiny_model_dir)
    assert not model.training and tokenizer.chat_template


def test_sampling_params_are_validated():
    with pytest.raises(ChatforgeError, match=r"generate\.top_p must be in \(0, 1\]"):
        section(SamplingParams, "generate", {"generate": {"top_p": 1.5}})
    assert section(SamplingParams, "generate", {}) == SamplingParams()
    assert SamplingParams().updated({"temperature": "0", "top_k": "5"}).top_k == 5
    with pytest.raises(ChatforgeError, match="top_k=1.5: expected an integer"):
        SamplingParams().updated({"top_k": "1.5"})
    with pytest.raises(ChatforgeError, match="unknown setting 'foo'"):
        SamplingParams().updated({"foo": "1"})


def test_repetition_penalty_spares_special_tokens(tiny_tokenizer):
    end, hello = end_of_turn_id(tiny_tokenizer), tiny_tokenizer.encode("Hello")[0]
    sampling = SamplingParams(temperature=0, repetition_penalty=100.0, max_new_tokens=1)
    # the scripted token scores 1.0, every other 0.5: a penalty of 100 on it hands the step to another
    for scripted, expected_kept in ((hello, False), (end, True)):  # both are in the prompt
        model = ScriptedModel([[scripted]], len(tiny_tokenizer), background=0.5)
        kept = generate_reply(model, tiny_tokenizer, ask("Hello"), sampling).token_ids == [scripted]
        assert kept == expected_kept


def test_params_floats_read_as_dvc_and_hydra_write_them(tmp_path):
    from chatforge.params import load_params

    (tmp_path / "params.yaml").write_text("ppo:\n  learning_rate: 5e-05\n  name: v1e5\n  steps: 8\n  clip: .2\n")
    assert load_params(tmp_path / "params.yaml") == {"ppo": {"learning_rate": 5e-05, "name": "v1e5", "steps": 8,
                                                             "clip": 0.2}}


def test_growing_cache_holds_what_a_concatenating_cache_holds():
    """Steps written in place, rows selected (a row leaving) and the buffer outgrown give DynamicCache's tensors."""
    from transformers import DynamicCache

    growing, reference = kv_cache.GrowingCache(), DynamicCache()
    generator = torch.Generator().manual_seed(0)
    for step, length in enumerate([5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]):
        if step == 6:
            for cache in (growing, reference):
                cache.batch_select_indices(torch.tensor([0, 2]))
        rows = 3 if step < 6 else 2
        keys, values = (torch.randn(rows, 2, length, 4, generator=generator) for _ in range(2))
        for layer in range(2):
            got = growing.update(keys, values, layer)
            expected = reference.update(keys, values, layer)
            assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert growing.get_seq_length() == reference.get_seq_length() == 16


def test_growing_layer_keeps_joins_and_trims_rows_in_place():
    """keep_rows (the last row fills a hole, leading padding goes) and add_rows (shorter rows and longer ones,
    zero-padded on the left) hold what the same edits on plain tensors hold; a step after them writes in place."""
    generator = torch.Generator().manual_seed(0)

    def states(rows, length):
        return torch.randn(rows, 2, length, 4, generator=generator)

    def pad_left(tensor, width):
        return torch.cat([tensor.new_zeros((*tensor.shape[:2], width - tensor.shape[2], tensor.shape[3])), tensor], 2)

    layer = kv_cache.GrowingLayer()
    keys = states(4, 6)
    layer.update(keys, keys.clone())
    layer.update(step := states(4, 1), step.clone())
    expected = torch.cat([keys, step], 2)
    assert torch.equal(layer.keys, expected)

    layer.keep_rows(torch.tensor([1]), torch.tensor([3]), count=3, drop_leading=2)  # row 1 left: row 3 moves in
    expected = expected[[0, 3, 2]][:, :, 2:]
    assert torch.equal(layer.keys, expected) and torch.equal(layer.values, expected)

    shorter, longer = states(2, 3), states(1, 9)
    layer.add_rows(shorter, shorter.clone())
    expected = torch.cat([expected, pad_left(shorter, 5)])
    assert torch.equal(layer.keys, expected)
    buffer = layer.keys.untyped_storage().data_ptr()
    layer.update(step := states(5, 1), step.clone())
    expected = torch.cat([expected, step], 2)
    assert torch.equal(layer.keys, expected) and layer.keys.untyped_storage().data_ptr() == buffer  # in place

    layer.add_rows(longer, longer.clone())  # longer than the batch: every row is padded on the left
    expected = torch.cat([pad_left(expected, 9), longer])
    assert torch.equal(layer.keys, expected) and torch.equal(layer.values, expected)
    layer.update(step := states(6, 1), step.clone())
    assert torch.equal(layer.keys, torch.cat([expected, step], 2))

