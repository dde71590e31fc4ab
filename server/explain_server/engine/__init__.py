"""The attribution engine: tower splitting, quadrature, factorised second-order attributions."""
