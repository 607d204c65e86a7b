"""Pipeline parallelism: where each schedule puts the stages (`placement`), the stage modules cut from
the model (`stages`), the eight-step engine under DualPipe / DualPipeV and 1F1B (`engine`,
`dualpipe`, `one_f_one_b`), point-to-point transfers (`p2p`), deferred weight gradients
(`weight_grad_store`) and the trainer-facing step runner (`runner`)."""
