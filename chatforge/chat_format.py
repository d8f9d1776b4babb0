"""The chat format shared by the tokenizer, SFT, generation, reward and PPO.

Every special token is a single id. Padding is distinct from end of text (the reward model pools at
the last non-pad token; if pad == eos it would pool the token before eos). `<|end|>` closes every
turn and is the end-of-turn token that generation stops at.

    <|bos|><|system|>You are kind.<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|><|eos|>

The Jinja template wraps assistant content and its `<|end|>` in `{% generation %}` so that
`apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly the tokens to train on.
"""

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
END_OF_TURN = "<|end|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD, BOS, EOS, END_OF_TURN, *ROLE_TOKENS.values()]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% elif message['role'] in ['system', 'user'] %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% else %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
