package usersclient

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"google.golang.org/grpc"

	usersv1 "github.com/users-grpc/users-grpc/clients/go/users/v1"
)

// keyServer answers GetPublicKeys with its keys, and counts the calls.
type keyServer struct {
	usersv1.UserServiceClient
	keys    map[string]*ecdsa.PrivateKey
	fetches int
}

func (s *keyServer) GetPublicKeys(context.Context, *usersv1.GetPublicKeysRequest, ...grpc.CallOption) (*usersv1.GetPublicKeysResponse, error) {
	s.fetches++
	set := map[string][]map[string]string{"keys": {}}
	for kid, key := range s.keys {
		x, y := key.PublicKey.X.FillBytes(make([]byte, 32)), key.PublicKey.Y.FillBytes(make([]byte, 32))
		set["keys"] = append(set["keys"], map[string]string{
			"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
			"x": base64.RawURLEncoding.EncodeToString(x), "y": base64.RawURLEncoding.EncodeToString(y),
		})
	}
	data, err := json.Marshal(set)
	return &usersv1.GetPublicKeysResponse{JwksJson: string(data)}, err
}

func (s *keyServer) add(t *testing.T, kid string) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	s.keys[kid] = key
}

func (s *keyServer) sign(t *testing.T, kid string, change func(jwt.MapClaims)) string {
	now := time.Now()
	claims := jwt.MapClaims{
		"iss": "users-grpc", "aud": "users-grpc", "sub": strings.Repeat("a", 24), "iat": now.Unix(),
		"exp": now.Add(15 * time.Minute).Unix(), "jti": "j", "role": "user", "sid": strings.Repeat("b", 24), "ver": 0,
	}
	if change != nil {
		change(claims)
	}
	token := jwt.NewWithClaims(jwt.SigningMethodES256, claims)
	token.Header["kid"], token.Header["typ"] = kid, "at+jwt"
	signed, err := token.SignedString(s.keys[kid])
	if err != nil {
		t.Fatal(err)
	}
	return signed
}

func TestVerifierCachesKeysAndFetchesAgainOnAnUnknownKid(t *testing.T) {
	server := &keyServer{keys: map[string]*ecdsa.PrivateKey{}}
	server.add(t, "one")
	verifier := NewVerifier(server, "users-grpc", "users-grpc")
	ctx := context.Background()
	for range 2 {
		claims, err := verifier.Verify(ctx, server.sign(t, "one", nil))
		if err != nil || claims.Role != RoleUser || claims.SessionID != strings.Repeat("b", 24) {
			t.Fatalf("claims %+v, error %v", claims, err)
		}
	}
	if server.fetches != 1 {
		t.Fatalf("%d fetches for one key", server.fetches)
	}

	server.add(t, "two")
	rotated := server.sign(t, "two", nil)
	// Within the interval an unknown kid is refused without asking the server again.
	if _, err := verifier.Verify(ctx, rotated); !errors.Is(err, ErrInvalidToken) || server.fetches != 1 {
		t.Fatalf("error %v after %d fetches", err, server.fetches)
	}
	verifier.refetch = 0
	if _, err := verifier.Verify(ctx, rotated); err != nil || server.fetches != 2 {
		t.Fatalf("error %v after %d fetches", err, server.fetches)
	}
}

func TestVerifierRefusesWhatIsNotAUserAccessTokenOfThisService(t *testing.T) {
	server := &keyServer{keys: map[string]*ecdsa.PrivateKey{}}
	server.add(t, "one")
	verifier := NewVerifier(server, "users-grpc", "users-grpc")
	for name, change := range map[string]func(jwt.MapClaims){
		"service account audience": func(c jwt.MapClaims) { c["aud"] = "users-grpc:service-accounts" },
		"another issuer":           func(c jwt.MapClaims) { c["iss"] = "someone-else" },
		"expired":                  func(c jwt.MapClaims) { c["exp"] = time.Now().Add(-time.Minute).Unix() },
		"unknown role":             func(c jwt.MapClaims) { c["role"] = "superuser" },
		"no version":               func(c jwt.MapClaims) { delete(c, "ver") },
		"no session":               func(c jwt.MapClaims) { delete(c, "sid") },
	} {
		if _, err := verifier.Verify(context.Background(), server.sign(t, "one", change)); !errors.Is(err, ErrInvalidToken) {
			t.Errorf("%s: accepted (%v)", name, err)
		}
	}
	token := server.sign(t, "one", nil)
	parts := strings.Split(token, ".")
	forged := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"none","typ":"at+jwt","kid":"one"}`))
	if _, err := verifier.Verify(context.Background(), forged+"."+parts[1]+"."); !errors.Is(err, ErrInvalidToken) {
		t.Errorf("alg none: accepted (%v)", err)
	}
}
