"""Model architectures as plain torch modules over ferry's layers."""
