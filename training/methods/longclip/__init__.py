"""Long-CLIP (docs/methods/longclip.md): stretched text positions (`positions.py`) and the
long-caption + short-caption-versus-principal-components loss (`loss.py`)."""
