module users-grpc/tests/tools/bcrypthash

go 1.22

require golang.org/x/crypto v0.31.0
