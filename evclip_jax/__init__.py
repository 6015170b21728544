"""evclip_jax: a frozen CLIP turned into an encoder for event cameras, in JAX/Flax."""

__version__ = "0.1.0"

__all__ = ["EventCLIP"]


def __getattr__(name):
    # Imported lazily so `import evclip_jax.events` stays light (no JAX/transformers import).
    if name == "EventCLIP":
        from evclip_jax.api import EventCLIP

        return EventCLIP
    raise AttributeError(f"module 'evclip_jax' has no attribute {name!r}")
