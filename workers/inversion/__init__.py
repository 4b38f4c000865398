"""Physics-aware fast structural inversion of SAXS profiles and GISAXS maps.

``saxs``: differentiable SAXS forward models (Schulz spheres, Percus-Yevick S(q), Guinier, Porod).
``gisaxs``: GISAXS in the decoupling approximation on a q_xy/q_z grid.
``encoder``: small networks mapping a profile or map to bounded physical parameters.
``refine``: batched LM refinement from the encoder's output, with standard errors.
"""
