"""Other training libraries using the same replay penalty: TRL's SFTTrainer (:mod:`.trl`)."""
