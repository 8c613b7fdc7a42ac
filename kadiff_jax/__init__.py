"""kadiff-jax: KA-Diff (knowledge-augmented text-to-image) in JAX/Flax.

    from kadiff_jax import KADiffPipeline
    pipe = KADiffPipeline.from_pretrained("tiny")
    image = pipe("a dog in the snow", reference="dog.jpg", ref_prompt="a dog", steps=10).images[0]
"""

__version__ = "0.1.0"
__all__ = ["KADiffOptions", "KADiffOutput", "KADiffPipeline", "KnowledgeAugmentedOutput",
           "KnowledgeAugmentedPipeline", "__version__"]


def __getattr__(name):  # the API loads JAX and Flax only when asked for, so `kadiff --help` stays quick
  if name in ("KADiffPipeline", "KADiffOutput", "KnowledgeAugmentedPipeline", "KnowledgeAugmentedOutput"):
    from kadiff_jax import pipeline
    return getattr(pipeline, name)
  if name == "KADiffOptions":
    from kadiff_jax.kadiff.options import KADiffOptions
    return KADiffOptions
  raise AttributeError(f"module 'kadiff_jax' has no attribute {name!r}")
