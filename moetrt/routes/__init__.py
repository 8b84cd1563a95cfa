"""Expert-load statistics and routing analysis from the engines' own routing outputs
(`layers.{i}.expert_ids`, see moetrt.names):

    trace   run prompts through a backend one sequence at a time, keep each token's experts per layer
    stats   per-layer counts, shares, balancedness, entropy, co-selected pairs, consecutive-token repetition
    report  the `moetrt routes` report (prompt vs generated tokens) and the comparison of two engines
    plot    the layer x expert share heatmap (PNG)
    live    Prometheus counters a server updates after each step
    run     `moetrt routes`

Nothing is imported here, so a server can take `live` without the rest (or torch).
"""
