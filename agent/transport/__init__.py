"""MQTT: the one module that imports paho (`mqtt`) and every topic name, pure (`topics`)."""
