"""RabbitMQ (`amqp://`, `amqps://`): broker and result backend over aiormq, with Go Machinery's
exchanges, queues and delay queues.
"""
