"""DeepSeek-V4 (Flash, Pro): compressed sparse attention, mHC hyper-connections, hash-routed
MoE layers. One variant of the registry (``localseek.model.variants``)."""
