"""Error feedback: remember what compression dropped and send it later.

Top-k and quantisation are biased per round; adding the residual of earlier rounds
(``sent - decoded``) to the next update makes the *cumulative* decoded sum track the
cumulative true sum (EF-SGD / ComPEFT practice). Clients keep one instance for the
uplink, the server one for the downlink; :meth:`ErrorFeedback.to_bytes` stores it in
Flower node state between rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from pollinate.codec.errors import MalformedPayload, ShapeMismatch


class ErrorFeedback:
    """Per-tensor residual memory (float32, CPU)."""

    def __init__(self, residual: Mapping[str, torch.Tensor] | None = None) -> None:
        self.residual: dict[str, torch.Tensor] = {
            name: t.detach().to("cpu", torch.float32).clone()
            for name, t in (residual or {}).items()}

    def compensate(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` plus the stored residual (float32 CPU); encode this, then :meth:`update`."""
        out = {}
        for name, t in tensors.items():
            x = t.detach().to("cpu", torch.float32)
            r = self.residual.get(name)
            if r is not None and r.shape != x.shape:
                raise ShapeMismatch(f"tensor {name!r} has shape {tuple(x.shape)}, "
                                    f"its residual {tuple(r.shape)}")
            out[name] = x + r if r is not None else x.clone()
        return out

    def update(self, sent: Mapping[str, torch.Tensor],
               decoded: Mapping[str, torch.Tensor]) -> None:
        """Set each sent tensor's residual to ``sent - decoded`` (all of it if not decoded).

        ``sent`` is what was given to ``encode`` (the compensated tensors), ``decoded``
        what the receiver will see. Residuals of tensors not in ``sent`` are kept.
        """
        for name, s in sent.items():
            x = s.detach().to("cpu", torch.float32)
            d = decoded.get(name)
            self.residual[name] = x - d.to("cpu", torch.float32) if d is not None else x.clone()

    def to_bytes(self) -> bytes:
        """The residual as a safetensors blob."""
        return save({name: t.contiguous() for name, t in self.residual.items()})

    @classmethod
    def from_bytes(cls, data: bytes) -> ErrorFeedback:
        """Inverse of :meth:`to_bytes`; raises :class:`MalformedPayload` on bad bytes."""
        try:
            return cls(load(bytes(data)))
        except SafetensorError as e:
            raise MalformedPayload(f"error-feedback state is not valid safetensors: {e}") from e


def encode_with_feedback(tensors: Mapping[str, torch.Tensor], feedback: ErrorFeedback | None,
                         encode: Callable[[Mapping[str, torch.Tensor]], bytes],
                         decode: Callable[[bytes], Mapping[str, torch.Tensor]], *,
                         need_decoded: bool = False) -> tuple[bytes, Mapping[str, torch.Tensor] | None]:
    """Encode ``tensors`` with error feedback: compensate, encode, decode our own payload, keep the residual.

    The one sequence both ends run (client uplink, server downlink). ``feedback=None``
    encodes ``tensors`` as they are. The payload is decoded (``decode``) only when the
    residual needs it or the caller does (``need_decoded``); returns ``(payload, decoded)``,
    ``decoded`` being ``None`` when it was not decoded.
    """
    sent = feedback.compensate(tensors) if feedback is not None else tensors
    payload = encode(sent)
    decoded = decode(payload) if feedback is not None or need_decoded else None
    if feedback is not None:
        feedback.update(sent, decoded)
    return payload, decoded
