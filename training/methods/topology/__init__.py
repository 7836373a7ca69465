"""The embedding topology (docs/methods/topology.md): the spaces and their similarities
(`spaces.py`: sphere, oblique Ob(n, m), its geodesic ablation, Multi(n, m), Euclidean) and the
towers with m [CLS] tokens that Multi needs (`multi_token.py`)."""
