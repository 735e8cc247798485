"""Chat formatting: conversations checked and turned into prompts with the model's own chat template,
and the images of their content parts collected as generate()'s image_data."""

from __future__ import annotations

from typing import Any, Union

from engine.shared.errors import short_repr


def chat_prompts(tokenizer: Any, messages: Any) -> Union[str, list[str]]:
    """The chat template applied to one conversation (a list of {"role", "content"} dicts) or to a
    list of them; a malformed conversation raises TypeError/ValueError naming `messages`."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TypeError(
            f"messages must be a non-empty list of {{'role', 'content'}} dicts, or a list of such lists, "
            f"got {short_repr(messages)}"
        )
    single = isinstance(messages[0], dict)
    conversations = [messages] if single else messages
    for c, conv in enumerate(conversations):
        where = "messages" if single else f"messages[{c}]"
        if not isinstance(conv, (list, tuple)) or not conv:
            raise TypeError(f"{where} must be a non-empty list of {{'role', 'content'}} dicts, got {short_repr(conv)}")
        for m, message in enumerate(conv):
            _check_message(f"{where}[{m}]", message)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; use generate() with a prompt")
    prompts = []
    for c, conv in enumerate(conversations):
        try:
            prompts.append(tokenizer.apply_chat_template(list(conv), tokenize=False, add_generation_prompt=True))
        except Exception as exc:  # the template's own checks (role order, content kinds) are user errors too
            where = "messages" if single else f"messages[{c}]"
            raise ValueError(f"{where} does not fit the model's chat template: {type(exc).__name__}: {exc}") from exc
    return prompts[0] if single else prompts


def chat_image_data(messages: Any) -> Any:
    """The images in the content parts of checked conversation(s), as generate()'s image_data (None when
    there are none): a list for one conversation, one list per conversation for several."""
    single = isinstance(messages[0], dict)
    per_conversation = _conversation_images([messages] if single else messages)
    if not any(per_conversation):
        return None
    return per_conversation[0] if single else per_conversation


def _check_message(where: str, message: Any) -> None:
    if not isinstance(message, dict):
        raise TypeError(f"{where} must be a {{'role', 'content'}} dict, got {short_repr(message)}")
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str) or not role:
        raise TypeError(f"{where}['role'] must be a non-empty str, got {short_repr(role)}")
    if not isinstance(content, (str, list)):
        raise TypeError(f"{where}['content'] must be a str (or a list of content parts), got {short_repr(content)}")


def _conversation_images(conversations: list[list[dict]]) -> list[list[Any]]:
    """The images of each conversation's content parts, in order: OpenAI's
    {"type": "image_url", "image_url": {"url": ...}} (or the url as a plain str) and HF's
    {"type": "image", "image": ...}."""
    out = []
    for c, conv in enumerate(conversations):
        images = []
        for m, message in enumerate(conv):
            content = message.get("content")
            for k, part in enumerate(content if isinstance(content, list) else []):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                elif kind == "image":
                    url = part.get("image")
                else:
                    continue
                if url is None:
                    where = (f"messages[{c}]" if len(conversations) > 1 else "messages") + f"[{m}]['content'][{k}]"
                    raise ValueError(f"{where} is an image part without its image (image_url.url)")
                images.append(url)
        out.append(images)
    return out
