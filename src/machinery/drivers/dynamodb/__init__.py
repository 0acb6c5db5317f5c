"""DynamoDB (`https://dynamodb...`): result backend over aiobotocore, Go Machinery's tables and items."""
