"""CLIP (docs/methods/clip.md): the symmetric InfoNCE every method's objective builds on."""
