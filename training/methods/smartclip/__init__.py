"""SmartCLIP (docs/methods/smartclip.md): the mask network over embedding dimensions
(`mask_network.py`), the modular contrastive loss with L1 sparsity (`loss.py`) and the masked
scorer evaluation may rank with (`scoring.py`). Its text side is Long-CLIP's (`longclip/`)."""
