"""Training methods, one place per method (docs/methods/): a recipe (`recipes.py`) names the
places its parts live in, and each part is found under `training/methods/<place>`:

- `clip/`: CLIP's symmetric InfoNCE (the base objective every method extends);
- `flip.py`: FLIP's random patch dropping;
- `pgs/`: CLIP-PGS's edge/similarity-guided patch selection;
- `longclip/`: Long-CLIP's stretched text positions and its long/short caption loss;
- `smartclip/`: SmartCLIP's mask network, modular loss and masked scorer;
- `topology/`: the embedding spaces (sphere, oblique, multi-[CLS], Euclidean ablations);
- `cibr/`: CIBR's mutual-information regulariser and its estimators.

A method's part imports only the base every method shares (`clip/`'s InfoNCE, the sphere of
`topology/spaces.py`, the tower helpers in training/towers.py) and what its method builds on
(PGS on FLIP's keep count); this package module imports nothing. tests/test_boundaries.py
holds the methods to that."""
