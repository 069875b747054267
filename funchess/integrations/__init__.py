"""Adapters that make funchess the curvature backend of other libraries (optional extras).

- `funchess.integrations.laplace`: `FunchessGGN`, `FunchessEF`, `FunchessHessian` backends for
  laplace-torch (`pip install "funchess[laplace]"`).

Each adapter imports its library only when the adapter module itself is imported, so
`import funchess` never needs them.
"""
