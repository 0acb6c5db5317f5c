"""AWS SQS (`https://sqs...`, `sqs://`): broker over aiobotocore, Go Machinery's message layout."""
