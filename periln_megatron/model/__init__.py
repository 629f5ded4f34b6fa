"""The model: layer specs by placement, the GPTModel and TransformerConfig built from a recipe, counts, FLOPs and memory."""
