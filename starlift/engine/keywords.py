"""transformers' ``generate()`` keywords, for code moving from it: mapped to starlift's where the
meaning is the same, refused with the starlift spelling where it is not."""

from __future__ import annotations

from starlift.core.errors import UsageError

# keyword -> what to use instead (refused: the meaning differs, or starlift has no such feature)
INSTEAD = {
    "max_length": "max_length counts the prompt's tokens too; starlift takes max_new_tokens (new tokens only)",
    "min_length": "starlift has no minimum length; ignore_eos=True generates exactly max_new_tokens tokens",
    "min_new_tokens": "starlift has no minimum length; ignore_eos=True generates exactly max_new_tokens tokens",
    "num_return_sequences": "starlift returns one sequence per prompt: pass the prompt N times in a list, with "
                            "temperature > 0, for N samples in one batch",
    "num_beams": "starlift decodes greedily or by sampling, without beam search",
    "streamer": "use Generator.stream(prompt, ...), which yields the text as it is generated",
    "eos_token_id": "starlift stops at the artifact's own eos_token_id; ignore_eos=True runs past it, "
                    "stop=[...] ends at any text",
    "pad_token_id": "starlift left-pads batches itself; no pad token is needed",
    "attention_mask": "starlift builds the attention mask itself from the prompts",
}
# keywords whose value 1 means what starlift does anyway
HARMLESS_ONE = {"num_return_sequences", "num_beams"}


def from_transformers(kwargs: dict, temperature: float, stop, where: str) -> tuple[float, object]:
    """(temperature, stop) after transformers' ``do_sample`` / ``stop_strings``; refuses the rest.

    ``do_sample=False`` is greedy (transformers ignores the temperature then); ``do_sample=True``
    samples at the temperature given, transformers' default 1.0 when none is.
    """
    kwargs = dict(kwargs)
    if "do_sample" in kwargs:
        do_sample = kwargs.pop("do_sample")
        if not isinstance(do_sample, bool):
            raise UsageError(f"do_sample must be True or False, got {do_sample!r}")
        temperature = (temperature or 1.0) if do_sample else 0.0
    if "stop_strings" in kwargs:
        if stop:
            raise UsageError("pass stop strings once: stop=[...] (transformers' stop_strings means the same)")
        stop = kwargs.pop("stop_strings")
    for name in [k for k in kwargs if k in HARMLESS_ONE and kwargs[k] == 1]:
        kwargs.pop(name)
    refused = [k for k in kwargs if k in INSTEAD]
    if refused:
        raise UsageError(f"{where} does not take {refused[0]}={kwargs[refused[0]]!r}: {INSTEAD[refused[0]]}")
    if kwargs:
        raise UsageError(f"unknown argument(s) to {where}: {', '.join(sorted(kwargs))}")
    return temperature, stop
