"""e2llm-edge runtime: codec, topics, MQTT bus, agents and orchestrator."""
