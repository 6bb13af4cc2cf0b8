"""LoRA adapters per request: the library of --lora-dir, the device store, the slots, the per-request manager."""
from kontext_server.lora.library import LoraError

__all__ = ["LoraError"]
