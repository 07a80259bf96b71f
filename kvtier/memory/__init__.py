"""Host and device memory pools."""
