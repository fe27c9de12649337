// Signs in, reads the user with the access token, verifies that token locally, and shows the
// ErrorInfo reason of a refused call.
//
//	EXAMPLE_PASSWORD=... go run ./examples/quickstart localhost:50051 jane
//
// Plaintext, as in the README's walk-through; EXAMPLE_ISSUER and EXAMPLE_AUDIENCE are the
// server's USERS_JWT_ISSUER and USERS_JWT_AUDIENCE (default users-grpc).
package main

import (
	"context"
	"fmt"
	"log"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	usersv1 "github.com/users-grpc/users-grpc/clients/go/users/v1"
	"github.com/users-grpc/users-grpc/clients/go/usersclient"
)

func main() {
	if len(os.Args) != 3 {
		log.Fatal("usage: quickstart HOST:PORT IDENTIFIER (the password in EXAMPLE_PASSWORD)")
	}
	address, identifier := os.Args[1], os.Args[2]
	issuer, audience := envOr("EXAMPLE_ISSUER", "users-grpc"), envOr("EXAMPLE_AUDIENCE", "users-grpc")

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := grpc.NewClient(address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	client := usersv1.NewUserServiceClient(conn)

	session, err := client.Authenticate(ctx, &usersv1.AuthenticateRequest{
		Identifier: identifier,
		Password:   os.Getenv("EXAMPLE_PASSWORD"),
	})
	if err != nil {
		log.Fatalf("sign-in refused: %v (reason %s)", err, usersclient.Reason(err))
	}
	fmt.Printf("signed in as %s (%s)\n", session.GetUser().GetUsername(), session.GetUser().GetId())

	authorized := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+session.GetAccessToken())
	user, err := client.GetUser(authorized, &usersv1.GetUserRequest{UserId: session.GetUser().GetId()})
	if err != nil {
		log.Fatalf("GetUser: %v", err)
	}
	fmt.Printf("GetUser: %s <%s>\n", user.GetUser().GetUsername(), user.GetUser().GetEmail())

	verifier := usersclient.NewVerifier(client, issuer, audience)
	claims, err := verifier.Verify(ctx, session.GetAccessToken())
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("verified locally: sub=%s role=%s sid=%s\n", claims.Subject, claims.Role, claims.SessionID)

	// Looking users up by name is for admins and machine callers: a user's token is refused.
	_, err = client.GetUserByIdentifier(authorized, &usersv1.GetUserByIdentifierRequest{Identifier: identifier})
	if err == nil {
		log.Fatal("GetUserByIdentifier was not refused")
	}
	fmt.Printf("refused: code=%s reason=%s\n", status.Code(err), usersclient.Reason(err))
}

func envOr(name, fallback string) string {
	if value := os.Getenv(name); value != "" {
		return value
	}
	return fallback
}
