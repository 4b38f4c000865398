"""The end-to-end benchmark behind `scatterflow bench` (and the frames benchmarks/ reuse): not
imported by the service itself."""
