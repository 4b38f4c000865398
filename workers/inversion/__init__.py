"""Physics-aware fast structural inversion of SAXS profiles and GISAXS maps.

``saxs``: differentiable SAXS forward models (Schulz spheres, Percus-Yevick S(q), Guinier, Porod).
``gisaxs``: GISAXS in the decoupling approximation on a q_xy/q_z grid (Born);
``dwba``: the same particles on a substrate or film in the distorted-wave Born approximation;
``maps``: a grazing run's own (q_xy, q_z) map as the data of the GISAXS inversion.
``encoder``: small networks mapping a profile or map to bounded physical parameters.
``refine``: batched LM refinement from the encoder's output, with standard errors.
"""
