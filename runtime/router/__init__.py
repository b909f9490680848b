"""The cache-aware router: one HTTP front for many `radixflow serve` workers (`radixflow router`,
`radixflow serve --dp-size N`). See docs/architecture.md."""
