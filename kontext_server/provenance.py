"""Provenance of the images the server returns: metadata saying they are AI-generated, and C2PA Content Credentials.

What: `Provenance.encode(image, fmt, quality, prompt)` is the one encoder every route (and `generate`) uses. It
writes, unless turned off (`--no-provenance-metadata`):
- EXIF `Software` (this server and its version), `Make` ("Black Forest Labs"), `Model` (the served model id) and,
  only with `--provenance-prompt`, `ImageDescription` (the prompt): the tags Black Forest Labs' reference CLI writes;
- in PNG files the same as text chunks (`Software`, `Make`, `Model`, `Description` with the prompt), plus `Source`
  and a `Comment` saying the image is AI-generated.
With `--c2pa-cert` and `--c2pa-key` (`C2paSigner`), each final image is then signed with a C2PA manifest: a
`c2pa.actions` assertion with one `c2pa.created` action, digitalSourceType trainedAlgorithmicMedia and the model as
its softwareAgent, claim_generator_info naming this server (no thumbnail: it costs ~100 ms and ~1 MB per 1024x1024
noise-like image). Streamed previews get the metadata but no signature (they are not the result).
What is not done: no invisible watermark (measured, docs/operations.md "Provenance"), no safety classifier ships.
Contract: `encode` runs in the thread pool; the signer serialises its calls (one native signer, a lock).
"""
from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from pathlib import Path

from kontext_server import __version__
from utils import DEFAULT_QUALITY, encode_image_bytes

MAKE = "Black Forest Labs"  # as BFL's reference CLI writes it
SOFTWARE = f"flux-kontext-server {__version__}"
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class ProvenanceConfigError(ValueError):
    """The C2PA certificate or key cannot be used (raised at start-up, with the reason)."""


@dataclass(frozen=True)
class Provenance:
    metadata: bool = True  # EXIF / PNG text saying what made the image
    prompt: bool = False  # also the prompt (ImageDescription / Description): off by default, prompts may be private
    model: str = "FLUX.1-Kontext-dev"  # EXIF Model: the served model id
    signer: "C2paSigner | None" = None

    def tags(self, prompt: str | None = None) -> dict[str, str]:
        """The metadata written into an image: EXIF tag names -> values (empty when turned off)."""
        if not self.metadata:
            return {}
        out = {"Software": SOFTWARE, "Make": MAKE, "Model": self.model}
        if self.prompt and prompt:
            out["ImageDescription"] = prompt
        return out

    def encode(self, image, fmt: str, quality: int = DEFAULT_QUALITY, prompt: str | None = None,
               final: bool = True) -> bytes:
        """The image as a png / jpeg / webp file with this server's provenance; `final` False (a preview): no
        C2PA signature."""
        data = encode_image_bytes(image, fmt, quality, metadata=self.tags(prompt))
        if final and self.signer is not None:
            data = self.signer.sign(data, fmt)
        return data

    def describe(self) -> dict:
        """What /health reports."""
        return {"metadata": self.metadata, "prompt_in_metadata": self.prompt and self.metadata,
                "c2pa": self.signer.describe() if self.signer is not None else None, "invisible_watermark": False}


def _algorithm(key) -> str:
    """The C2PA signing algorithm for a private key (cryptography's key object)."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, ec.EllipticCurvePrivateKey):
        algs = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}
        if key.curve.name in algs:
            return algs[key.curve.name]
        raise ProvenanceConfigError(f"C2PA signs with P-256, P-384 or P-521 EC keys, not {key.curve.name}")
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    if isinstance(key, rsa.RSAPrivateKey):
        return "ps256"
    raise ProvenanceConfigError(f"unsupported private key type for C2PA: {type(key).__name__}")


class C2paSigner:
    """Signs encoded images with a C2PA manifest (c2pa-python), with the operator's certificate chain and key.

    The chain (PEM) starts with the signing certificate, which C2PA requires to be an end-entity certificate (not a
    CA, not self-signed) with the digitalSignature key usage and an extended key usage such as emailProtection or
    documentSigning; the key is its PEM private key (EC P-256 / P-384 / P-521, Ed25519 or RSA-PSS)."""

    def __init__(self, cert_chain_pem: bytes, key_pem: bytes, model: str, tsa_url: str | None = None,
                 source: str = "PEM"):
        import c2pa
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        try:
            self.alg = _algorithm(load_pem_private_key(key_pem, password=None))
        except (ValueError, TypeError) as exc:
            if isinstance(exc, ProvenanceConfigError):
                raise
            raise ProvenanceConfigError(f"the C2PA key is not an unencrypted PEM private key: {exc}") from None
        self.model, self.source, self._lock = model, source, threading.Lock()
        self._c2pa = c2pa
        try:
            self._signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(self.alg, cert_chain_pem, key_pem, tsa_url))
            self._context = c2pa.Context(c2pa.Settings.from_dict({"builder": {"thumbnail": {"enabled": False}}}))
        except Exception as exc:  # c2pa's own errors: a chain it cannot use
            raise ProvenanceConfigError(f"c2pa refused the certificate or key: {exc}") from None
        self.check()

    @classmethod
    def from_files(cls, cert_path: str | Path, key_path: str | Path, model: str) -> "C2paSigner":
        try:
            cert, key = Path(cert_path).read_bytes(), Path(key_path).read_bytes()
        except OSError as exc:
            raise ProvenanceConfigError(f"cannot read the C2PA certificate or key: {exc}") from None
        return cls(cert, key, model, source=f"{cert_path}")

    def manifest(self, fmt: str) -> dict:
        return {
            "claim_generator_info": [{"name": "flux-kontext-server", "version": __version__}],
            "title": f"image.{fmt}",
            "format": MIME[fmt],
            "assertions": [{"label": "c2pa.actions", "data": {"actions": [{
                "action": "c2pa.created",
                "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                "softwareAgent": {"name": self.model},
            }]}}],
        }

    def sign(self, data: bytes, fmt: str) -> bytes:
        """`data` (an encoded png / jpeg / webp file) with its C2PA manifest embedded."""
        out = io.BytesIO()
        with self._lock, self._c2pa.Builder(self.manifest(fmt), self._context) as builder:
            builder.sign(self._signer, MIME[fmt], io.BytesIO(data), out)
        return out.getvalue()

    def check(self) -> None:
        """Sign a tiny image once: a certificate c2pa cannot sign with fails at start-up, not on a request."""
        from PIL import Image

        try:
            self.sign(encode_image_bytes(Image.new("RGB", (16, 16)), "png"), "png")
        except Exception as exc:
            raise ProvenanceConfigError(f"c2pa cannot sign with this certificate and key: {exc}") from None

    def describe(self) -> dict:
        return {"algorithm": self.alg, "certificate": self.source, "action": "c2pa.created",
                "digital_source_type": "trainedAlgorithmicMedia", "software_agent": self.model}


def read_manifest(data: bytes, fmt: str) -> dict | None:
    """The active C2PA manifest of an encoded image and its validation state (for tests and operators), or None."""
    import json

    import c2pa

    try:
        with c2pa.Reader(MIME[fmt], io.BytesIO(data)) as reader:
            store = json.loads(reader.json())
            state = reader.get_validation_state()
    except Exception:  # no manifest in the file
        return None
    active = store["manifests"][store["active_manifest"]]
    return {"manifest": active, "validation_state": state, "validation_status": store.get("validation_status", []),
            "validation_results": store.get("validation_results", {})}
