"""Request bodies. Strict types ("5" is not an integer, true is not a number); fields the
server does not use (user, best_of, suffix, logit_bias, ...) are ignored, as OpenAI clients
send them; `null` means "the default" for the optional fields clients like to send."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# A prompt: text, texts, token ids, or lists of token ids (one per prompt).
Prompt = str | list[str] | list[int] | list[list[int]]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool | None = None


class CompletionRequest(_Body):
    prompt: Prompt
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0.0, le=10.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, ge=0.01, le=10.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**62)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0)
    echo: bool | None = None
    model: str | None = None
    return_retrieval: bool = False


class RetrieveRequest(_Body):
    text: str = Field(min_length=1)
    k: int = Field(4, ge=1)


class TokenizeRequest(_Body):
    prompt: str
    add_special_tokens: bool | None = None  # our tokenizer adds none either way


class DetokenizeRequest(_Body):
    tokens: list[int]
