"""The Ollama Modelfile beside an exported GGUF: the chat template in Go template syntax, the stop strings and
sampling defaults.

Ollama renders prompts with Go's text/template, not Jinja, so the model's chat template is translated. Rather than
parse Jinja, the template is asked: it renders marker conversations, and the text around each marker gives what it
writes around a message of each role, before the first message, before a first message that is not a system
message (SmolLM2's default system prompt) and to open the reply. A template that does not render message by
message that way (checked on several conversations) is refused in one line, since no Modelfile could state it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from chatforge.errors import ChatforgeError

ROLES = ("system", "user", "assistant")
_MARKERS = {role: f"CHATFORGE_{role.upper()}_TEXT" for role in ROLES}


@dataclass(frozen=True)
class TurnFormat:
    """What a chat template writes around the contents of a conversation."""

    preamble: str  # before the first message (ours: `<|bos|>`)
    default_system: str  # before a first message that is not a system message
    around: dict[str, tuple[str, str]]  # role -> (before its content, after it)
    reply_prompt: str  # opens the assistant's reply (add_generation_prompt)

    def render(self, messages: list[dict], reply_prompt: bool) -> str:
        """The conversation as the Jinja template writes it; `go_template` writes the same in Go."""
        text = self.preamble + (self.default_system if messages and messages[0]["role"] != "system" else "")
        for message in messages:
            before, after = self.around[message["role"]]
            text += before + message["content"] + after
        return text + (self.reply_prompt if reply_prompt else "")


def turn_format(tokenizer, template: str, where: str) -> TurnFormat:
    """The template's TurnFormat, read from its renderings of marker conversations and checked on others."""
    from chatforge.tokenization import chat_text, preamble_text

    def render(roles: tuple[str, ...], reply_prompt: bool = False) -> str:
        messages = [{"role": r, "content": _MARKERS[r]} for r in roles]
        try:
            return chat_text(tokenizer, messages, reply_prompt, template)
        except Exception as error:  # e.g. a template without a system role raises on one
            raise _refusal(where, f"a {'/'.join(roles)} conversation raises {type(error).__name__}: {error}") from None

    preamble = preamble_text(tokenizer, template)
    around, previous = {}, preamble
    for count, role in enumerate(ROLES, start=1):  # system, then user after it, then assistant after both
        rendered = render(ROLES[:count])
        around[role] = _split(rendered, previous, _MARKERS[role], where)
        previous = rendered
    reply_prompt = _rest(render(ROLES[:2], reply_prompt=True), render(ROLES[:2]), where)
    lone_user = render(("user",))
    user_turn = around["user"][0] + _MARKERS["user"] + around["user"][1]
    if not (lone_user.startswith(preamble) and lone_user.endswith(user_turn)):
        raise _refusal(where, "a first user message renders with text around it that depends on later ones")
    found = TurnFormat(preamble, lone_user[len(preamble):len(lone_user) - len(user_turn)], around, reply_prompt)
    _check(found, render, where)
    return found


def _rest(text: str, prefix: str, where: str) -> str:
    """`text` past `prefix`, which a template that renders message by message writes first."""
    if not text.startswith(prefix):
        raise _refusal(where, "adding to a conversation changes how its start renders")
    return text[len(prefix):]


def _split(text: str, prefix: str, marker: str, where: str) -> tuple[str, str]:
    """(before, after) the one marker in `text` past `prefix`."""
    before, found, after = _rest(text, prefix, where).partition(marker)
    if not found or marker in after:
        raise _refusal(where, "a message's content does not appear once")
    return before, after


def _check(found: TurnFormat, render, where: str) -> None:
    for roles in [("user", "assistant", "user"), ("system", "user", "assistant", "user", "assistant"),
                  ("user", "assistant", "system", "user")]:
        for reply_prompt in (False, True):
            messages = [{"role": r, "content": _MARKERS[r]} for r in roles]
            if found.render(messages, reply_prompt) != render(roles, reply_prompt):
                raise _refusal(where, f"a {'/'.join(roles)} conversation renders otherwise")


def _refusal(where: str, why: str) -> ChatforgeError:
    return ChatforgeError(f"{where}: its chat template does not render one message at a time ({why}); an Ollama "
                          f"Modelfile cannot state it, so nothing was exported")


def go_template(turns: TurnFormat) -> str:
    """The TurnFormat as an Ollama TEMPLATE. Every literal is a Go string constant inside an action, so the `{{-`
    that trims the layout's newlines never trims the template's own whitespace. A conversation that ends with an
    assistant message leaves it open, which is how Ollama continues a reply."""
    def text(value: str) -> str:
        return "{{ " + json.dumps(value, ensure_ascii=False) + " }}" if value else ""

    (system_before, system_after), (user_before, user_after), (reply_before, reply_after) = (
        turns.around[role] for role in ROLES)
    lines = [
        "{{- " + json.dumps(turns.preamble, ensure_ascii=False) + " }}" if turns.preamble else "",
        "{{- range $i, $_ := .Messages }}",
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
        f'{{{{- if and (eq $i 0) (ne .Role "system") }}}}{text(turns.default_system)}{{{{ end }}}}'
        if turns.default_system else "",
        f'{{{{- if eq .Role "system" }}}}{text(system_before)}{{{{ .Content }}}}{text(system_after)}',
        f'{{{{- else if eq .Role "user" }}}}{text(user_before)}{{{{ .Content }}}}{text(user_after)}',
        f'{{{{- else if eq .Role "assistant" }}}}{text(reply_before)}{{{{ .Content }}}}'
        + (f"{{{{ if not $last }}}}{text(reply_after)}{{{{ end }}}}" if reply_after else ""),
        "{{- end }}",
        f'{{{{- if and $last (ne .Role "assistant") }}}}{text(turns.reply_prompt)}{{{{ end }}}}'
        if turns.reply_prompt else "",
        "{{- end }}",
    ]
    return "\n".join(line for line in lines if line)


def modelfile(gguf_name: str, turns: TurnFormat, stops: list[str], context_length: int, sampling) -> str:
    """Modelfile text: FROM the GGUF beside it, the TEMPLATE, a stop per stop string, and our sampling defaults
    (params.yaml `generate`) as Ollama's parameters of the same meaning."""
    lines = ["# written by `chatforge export`; run it in Ollama with: ollama create NAME -f THIS_FILE",
             f"FROM ./{gguf_name}", f'TEMPLATE """{go_template(turns)}"""']
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops]
    lines += [f"PARAMETER temperature {sampling.temperature}", f"PARAMETER top_p {sampling.top_p}",
              f"PARAMETER top_k {sampling.top_k}", f"PARAMETER repeat_penalty {sampling.repetition_penalty}",
              f"PARAMETER num_ctx {context_length}"]
    return "\n".join(lines) + "\n"
