"""Code shared by every gorb process: the model, validation, message schemas and the bus."""
