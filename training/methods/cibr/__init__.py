"""CIBR (docs/methods/cibr.md): the regulariser λ·[I(Z_v; X_v | X_t) + I(Z_t; X_t | X_v)] around
any objective (`objective.py`), with its mutual-information estimators (`mutual_information.py`)."""
