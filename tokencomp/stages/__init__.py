"""The engine's stages, one module each along the data path: vision encoding (`vision`), sequence
build (`sequence`), the decoder layer loop (`decoder`, with its captures in `captures` and frozen
layers in `frozen`) and decoding (`decoding`). Each is a mixin of `tokencomp.Engine`, which holds
the run's model, options and strategy plan and composes them; tests and benchmarks reach a stage's
steps through the engine."""
